"""The folder contracts: the names of the files and folders that radfed's parts share.

- a **site folder** holds a hospital's ``manifest.csv`` (with the images it points at), the
  site's ``site-policy.toml``, and radfed's state for that site in ``.radfed/``;
- a **data root** (simulation) is a folder of site folders, ``DATA/<site>/manifest.csv``;
- a **run folder** is what one federated run writes on the server machine;
- the **server state folder** (``radfed server start --state``) holds the SuperLink's
  database and the registry of site keys;
- the **app folder** is the radfed Flower app that ``radfed simulate`` and ``radfed launch``
  run (a ``pyproject.toml`` with ``[tool.flwr.app]`` beside ``server/`` and ``client/``).

Nothing here imports torch, Flower or any other radfed room.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from radfed.errors import ConfigError, DataError

__all__ = [
    "APP_ENV",
    "MANIFEST_NAME",
    "POLICY_FILE_NAME",
    "POOLED_SITE",
    "SITES_FILE_ENV",
    "STORE_ENV",
    "RunEvent",
    "RunFiles",
    "ServerState",
    "SiteFolder",
    "SiteState",
    "app_components",
    "find_app_dir",
    "list_sites",
]


class RunEvent(StrEnum):
    """The kinds of line in a run's ``events.jsonl`` (``RunFolder.event`` writes them).

    Every line holds ``at``, ``kind``, ``level``, ``round``, ``site`` and ``message``, and
    the facts named here; the run store builds its rounds and sites tables from them.
    """

    RUN_STARTED = "run-started"  # rounds, sites (the run's named sites, may be empty)
    RUN_RESUMED = "run-resumed"  # after_round
    WAITING = "waiting"  # missing (site names), connected
    LATE = "late"  # missing: the round started without them
    PHASE_STARTED = "phase-started"  # phase, asked
    PHASE_ENDED = "phase-ended"  # phase, asked, replied (site names), dropped {site: why}
    SITE_ERROR = "site-error"  # code, refusal (the site's policy refused)
    DROPPED = "dropped"  # what (update, statistics): a reply that broke the contract
    SECURITY = "security"  # node: a reply from a key not registered from the PKI
    REPORT = "report"  # the bias report of the round was written
    ROUND_ENDED = "round-ended"  # seconds
    RUN_FINISHED = "run-finished"
    RUN_FAILED = "run-failed"  # the reason


#: The ``site`` of metrics, cells and curves computed from the merged statistics of all sites.
POOLED_SITE = "ALL"
#: Environment variable naming the app folder, when it is not found on its own.
APP_ENV = "RADFED_APP"
#: Environment variable naming the run store (a SQLAlchemy URL, or ``none``): the ServerApp
#: writes to it as a run goes (``radfed.store``).
STORE_ENV = "RADFED_STORE"
#: Environment variable naming the server's site registry (``ServerState.sites``); the
#: ServerApp inherits it from the SuperLink that ``radfed server start`` runs.
SITES_FILE_ENV = "RADFED_SITES_FILE"

MANIFEST_NAME = "manifest.csv"
POLICY_FILE_NAME = "site-policy.toml"
_STATE_DIR_NAME = ".radfed"


@dataclass(frozen=True)
class SiteState:
    """radfed's own state for one site (``SITE_DIR/.radfed/``); it never leaves the site."""

    path: Path

    @property
    def cache(self) -> Path:
        """Decoded, preprocessed cases (``radfed.data.cache``)."""
        return self.path / "cache"

    @property
    def split(self) -> Path:
        """The fixed patient-disjoint split, patient keys hashed."""
        return self.path / "split.json"

    @property
    def test_uses(self) -> Path:
        """How often the sealed test split was evaluated."""
        return self.path / "test_uses.json"

    @property
    def privacy(self) -> Path:
        """The privacy the site's DP updates spent (``radfed.privacy.accountant``)."""
        return self.path / "privacy.jsonl"

    @property
    def queries(self) -> Path:
        """The requests the site answered (``radfed.privacy.budget``)."""
        return self.path / "queries.jsonl"

    @property
    def releases(self) -> Path:
        """The case sets of the cells the site released (``radfed.privacy.releases``)."""
        return self.path / "releases.jsonl"

    @property
    def audit_log(self) -> Path:
        """Everything that left the site, hash-chained."""
        return self.path / "audit.jsonl"

    @property
    def pseudonym_key(self) -> Path:
        """The secret that ``radfed site index`` keys patient pseudonyms with."""
        return self.path / "pseudonym.key"

    @property
    def flwr_home(self) -> Path:
        """Flower's home of a deployed site."""
        return self.path / "flwr-home"

    @property
    def programs(self) -> Path:
        """The programs a deployed site's SuperExec starts (radfed's ``flwr-clientapp``)."""
        return self.path / "bin"

    @property
    def superexec_secret(self) -> Path:
        """The secret that the site's SuperNode and SuperExec share (Runtime API auth)."""
        return self.path / "superexec.secret"

    def fedbn(self, run_id: int) -> Path:
        """The site's own normalisation layers of one run (FedBN)."""
        return self.path / "fedbn" / f"run-{run_id}.pt"


@dataclass(frozen=True)
class SiteFolder:
    """A site folder: ``manifest.csv``, ``site-policy.toml`` and ``.radfed/``."""

    path: Path

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def policy(self) -> Path:
        return self.path / POLICY_FILE_NAME

    @property
    def state(self) -> SiteState:
        return SiteState(self.path / _STATE_DIR_NAME)


@dataclass(frozen=True)
class RunFiles:
    """The files of a run folder (DESIGN.md, "Run folder"), and readers of its JSON files;
    ``radfed.central.run_folder.RunFolder`` writes them."""

    path: Path

    def read_config(self) -> dict[str, Any]:
        """config.json: ``run-config``, versions and the facts given at the start."""
        document: dict[str, Any] = json.loads(self.config.read_text())
        return document

    def read_metrics(self) -> Iterator[dict[str, Any]]:
        """The lines of metrics.jsonl as dictionaries."""
        with self.metrics.open() as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)

    def read_bias_report(self) -> dict[str, Any]:
        """The last bias_report.json written."""
        report: dict[str, Any] = json.loads(self.bias_report.read_text())
        return report

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def events(self) -> Path:
        """events.jsonl: what happened during the run, one JSON object a line, in order."""
        return self.path / "events.jsonl"

    @property
    def bias_report(self) -> Path:
        return self.path / "bias_report.json"

    @property
    def bias_report_html(self) -> Path:
        return self.path / "bias_report.html"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, round_: int) -> Path:
        """The global model after ``round_`` (0: the initial model)."""
        return self.checkpoints / f"round-{round_:03d}.pt"

    def saved_checkpoints(self) -> dict[int, Path]:
        """The round checkpoints on disk, by round."""
        return {int(p.stem.split("-")[1]): p for p in self.checkpoints.glob("round-*.pt")}

    @property
    def server_state(self) -> Path:
        """The last completed round and the strategy's server-optimiser state (resume)."""
        return self.checkpoints / "server-state.pt"


@dataclass(frozen=True)
class ServerState:
    """The server's state folder (``radfed server start --state``)."""

    path: Path

    @property
    def database(self) -> Path:
        """The SuperLink's database (runs survive a restart)."""
        return self.path / "superlink.db"

    @property
    def sites(self) -> Path:
        """The site registry ``{site: node id}`` of the registered keys."""
        return self.path / "sites.json"

    @property
    def site_keys(self) -> Path:
        """``{site: key fingerprint}`` of the keys the registry's nodes were registered with."""
        return self.path / "site-keys.json"

    @property
    def flwr_home(self) -> Path:
        return self.path / "flwr-home"

    @property
    def edge(self) -> Path:
        """The edge's (nginx) configuration, temporary files and PID file."""
        return self.path / "edge"


def list_sites(data_root: Path) -> list[Path]:
    """The site folders of a simulation data root (``DATA/<site>/manifest.csv``), sorted.

    Raises:
        DataError: the root is missing or holds no site folder.
    """
    if not data_root.is_dir():
        msg = (
            f"{data_root}: data root not found; create sites with 'radfed synth' "
            "or point --data at a folder of site folders"
        )
        raise DataError(msg)
    sites = sorted(
        p for p in data_root.iterdir() if p.is_dir() and SiteFolder(p).manifest.is_file()
    )
    if not sites:
        msg = (
            f"{data_root}: no site folders (sub-folders holding {MANIFEST_NAME}); "
            "generate some with 'radfed synth --out DATA' or check the path"
        )
        raise DataError(msg)
    return sites


def find_app_dir(start: Path | None = None) -> Path:
    """The radfed Flower app folder.

    Looked up in order: ``$RADFED_APP``; ``start`` (default: the working directory) and
    its parents; the folder above the installed ``radfed`` package (an editable install).

    Raises:
        ConfigError: none of them holds the radfed app.
    """
    candidates: list[Path] = []
    if os.environ.get(APP_ENV):
        candidates.append(Path(os.environ[APP_ENV]))
    here = (start or Path.cwd()).resolve()
    candidates += [here, *here.parents]
    candidates.append(Path(__file__).resolve().parent.parent)
    for folder in candidates:
        if _is_radfed_app(folder):
            return folder
    msg = (
        f"cannot find the radfed Flower app (a pyproject.toml with [tool.flwr.app] and "
        f"server/ client/); run from the radfed project folder or set {APP_ENV}"
    )
    raise ConfigError(msg)


def app_components(app: Path) -> dict[str, str]:
    """The app's ``[tool.flwr.app.components]`` (``serverapp``, ``clientapp``)."""
    document = tomllib.loads((app / "pyproject.toml").read_text())
    return dict(document["tool"]["flwr"]["app"]["components"])


def _is_radfed_app(folder: Path) -> bool:
    project = folder / "pyproject.toml"
    if not (project.is_file() and (folder / "server").is_dir() and (folder / "client").is_dir()):
        return False
    try:
        document = tomllib.loads(project.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return document.get("project", {}).get("name") == "radfed" and "flwr" in document.get(
        "tool", {}
    )
