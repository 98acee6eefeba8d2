"""Simulating sites on one machine: the radfed Flower app run by Flower's simulation engine.

``radfed simulate`` runs the app from the project folder (the folder whose pyproject.toml
has ``[tool.flwr.app]``), as ``flwr run .`` does against a local simulation, but in the
foreground, with one virtual node per site folder and nothing left running afterwards.
It does what Flower's ``flwr-simulation`` process does after it has fetched the app:
fuse the app's run config with the overrides and start the simulation engine (Ray).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from radfed.config import RunConfig
from radfed.data.manifest import read_manifest
from radfed.data.site import list_sites
from radfed.errors import ConfigError
from radfed.log import logger
from radfed.tasks import get_task

__all__ = ["APP_ENV", "find_app_dir", "simulate"]

#: Environment variable naming the project folder, when it is not found on its own.
APP_ENV = "RADFED_APP"


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


def simulate(
    data_root: Path,
    out_dir: Path,
    overrides: Mapping[str, bool | int | float | str] | None = None,
    *,
    app_dir: Path | None = None,
    verbose: bool = False,
) -> Path:
    """Run a federated training over the site folders of ``data_root``.

    Everything that can be checked before Flower starts is checked first: the data root,
    every site's manifest and the run configuration.

    Args:
        data_root: a folder of site folders (``DATA/<site>/manifest.csv``).
        out_dir: the run folder to write.
        overrides: run-config values (kebab-case keys) over the app's defaults.
        app_dir: the app folder; found with ``find_app_dir`` when None.
        verbose: show Flower's own log.

    Returns:
        The run folder.
    """
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    app = (app_dir or find_app_dir()).resolve()
    data_root, out_dir = data_root.resolve(), out_dir.resolve()
    sites = list_sites(data_root)
    given = dict(overrides or {})
    task = str(given.get("task", "classification"))
    for site in sites:
        read_manifest(site, task)
    override = {
        **given,
        "data-root": str(data_root),
        "out-dir": str(out_dir),
        "min-sites": len(sites),
    }
    try:
        run_config = get_fused_config_from_dir(app, override)
    except ValueError as err:
        raise ConfigError(f"unknown run-config key: {err}") from None
    config = RunConfig.from_run_config(run_config)
    get_task(config.task).check(config)
    names = [site.name for site in sites]
    if config.holdout_site and config.holdout_site not in names:
        msg = (
            f"--holdout-site {config.holdout_site!r} is not a site folder of the data root "
            f"({', '.join(names)})"
        )
        raise ConfigError(msg)
    if config.holdout_site and len(names) < 2:
        raise ConfigError("--holdout-site needs at least one other site to train")
    logger.info(
        "simulating %d sites (%s), %d rounds, app %s",
        len(sites),
        ", ".join(s.name for s in sites),
        config.num_server_rounds,
        app,
    )

    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = override
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    cpus = os.cpu_count() or 1
    components = _components(app)
    _run_simulation(
        num_supernodes=len(sites),
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        server_app_attr=components["serverapp"],
        client_app_attr=components["clientapp"],
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": _gpus_per_site(len(sites))},
            "init_args": {
                "num_cpus": cpus,
                "include_dashboard": False,
                "logging_level": "ERROR",
                "log_to_driver": verbose,
            },
        },
        app_dir=str(app),
        run=run,
        server_app_context=context,
        is_app=True,
        verbose_logging=verbose,
    )
    if not (out_dir / "metrics.jsonl").is_file():
        raise ConfigError("the simulation ended without a run folder; rerun with --verbose")
    return out_dir


def _components(app: Path) -> dict[str, str]:
    document = tomllib.loads((app / "pyproject.toml").read_text())
    return dict(document["tool"]["flwr"]["app"]["components"])


def _gpus_per_site(sites: int) -> float:
    """Share one GPU among the simulated sites when there is one."""
    try:
        import torch

        return 1.0 / sites if torch.cuda.is_available() else 0.0
    except ImportError:
        return 0.0
