"""Writer and reader of a run folder (the file names are ``radfed.folders.RunFiles``)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from radfed import __version__
from radfed.config import RunConfig
from radfed.errors import ConfigError
from radfed.federation.checkpoint import save_checkpoint
from radfed.federation.schema import STATS_SCHEMA_VERSION
from radfed.folders import RunEvent, RunFiles

__all__ = ["RESUMABLE_CHANGES", "RunFolder"]

#: Run settings that may change when a run is resumed (how long to wait, not what to train).
RESUMABLE_CHANGES = frozenset({"resume", "site-wait", "round-timeout", "sites", "min-sites"})


@dataclass(frozen=True)
class RunFolder:
    """Writer and reader of one run folder.

    ``on_event`` is called after every event is written (the run store's sync, which
    catches its own errors): the folder is written first, so the store can always catch up.
    """

    path: Path
    on_event: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def feeding(self, on_event: Callable[[], None] | None) -> RunFolder:
        """This folder, calling ``on_event`` after every event written."""
        return replace(self, on_event=on_event)

    @property
    def run_id(self) -> str:
        """The run's id (config.json ``run-id``), new for each run started in the folder."""
        return str(self.read_config().get("run-id", ""))

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.path)

    @property
    def metrics_path(self) -> Path:
        return self.files.metrics

    @property
    def checkpoints(self) -> Path:
        return self.files.checkpoints

    @property
    def bias_report_path(self) -> Path:
        return self.files.bias_report

    @classmethod
    def start(cls, path: Path, config: RunConfig, **facts: Any) -> RunFolder:
        """Begin a new run: write config.json, empty metrics.jsonl and checkpoints/.

        Args:
            path: the run folder (created when missing).
            config: the effective configuration.
            **facts: further facts to record in config.json (e.g. the sites).
        """
        folder = cls(path)
        path.mkdir(parents=True, exist_ok=True)
        if folder.checkpoints.exists():
            shutil.rmtree(folder.checkpoints)
        folder.checkpoints.mkdir()
        document = {
            "run-id": uuid.uuid4().hex,
            "run-config": config.to_run_config(),
            "radfed-version": __version__,
            "stats-schema-version": STATS_SCHEMA_VERSION,
            **facts,
        }
        folder.files.config.write_text(json.dumps(document, indent=2) + "\n")
        folder.metrics_path.write_text("")
        folder.files.events.write_text("")
        return folder

    @classmethod
    def resume(cls, path: Path, config: RunConfig) -> tuple[RunFolder, int]:
        """Reopen a run to continue after its last completed round.

        Lines and checkpoints of a round that did not complete are removed, so the resumed
        run writes every round once.

        Returns:
            The folder and the last completed round (0: none completed).

        Raises:
            ConfigError: no run to resume there, or its settings differ from ``config`` in
                anything but how long to wait.
        """
        folder = cls(path)
        if not folder.files.config.is_file():
            raise ConfigError(f"nothing to resume in {path}: it has no config.json; drop --resume")
        stored = folder.read_config().get("run-config", {})
        given = config.to_run_config()
        changed = sorted(
            k
            for k in set(stored) | set(given)
            if k not in RESUMABLE_CHANGES and stored.get(k) != given.get(k)
        )
        if changed:
            msg = (
                f"cannot resume {path} with different settings ({', '.join(changed[:5])}); "
                "resume with the run's own settings or start a new run folder"
            )
            raise ConfigError(msg)
        state = folder.load_state()
        done = int(state["round"]) if state else 0
        if not folder.checkpoint_path(done).is_file():
            raise ConfigError(f"cannot resume {path}: checkpoint of round {done} is missing")
        kept = [line for line in folder.read_metrics() if int(line["round"]) <= done]
        tmp = folder.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
        os.replace(tmp, folder.metrics_path)
        for round_, stale in folder.files.saved_checkpoints().items():
            if round_ > done:
                stale.unlink()
        return folder, done

    def read_config(self) -> dict[str, Any]:
        """config.json: ``run-config``, versions and the facts given at the start."""
        return self.files.read_config()

    def append_metrics(
        self,
        round_: int,
        site: str,
        split: str,
        n: int,
        metrics: Mapping[str, float | None],
        *,
        suppressed: bool = False,
        noise_sd: float | None = None,
    ) -> None:
        """Append one (round, site, split) line to metrics.jsonl.

        A suppressed cell (fewer cases than the site's minimum cell size) has ``n`` null.
        Statistics with DP noise add ``noise_sd``, the standard deviation of the noise on
        each of their histogram bins (``n`` is then a noisy count).
        """
        line: dict[str, Any] = {
            "round": round_,
            "site": site,
            "split": split,
            "n": None if suppressed else n,
            "suppressed": suppressed,
            "metrics": dict(metrics),
        }
        if noise_sd is not None:
            line["noise_sd"] = round(noise_sd, 6)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")

    def event(
        self,
        kind: RunEvent,
        message: str,
        *,
        round_: int | None = None,
        site: str | None = None,
        level: str = "info",
        **facts: Any,
    ) -> None:
        """Append one line to events.jsonl (what happened, for the store and the dashboard).

        ``message`` is the server's own words (it never quotes what a site sent).
        """
        line = {
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "kind": str(kind),
            "level": level,
            "round": round_,
            "site": site,
            "message": message,
            **facts,
        }
        with self.files.events.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        if self.on_event is not None:
            self.on_event()

    def write_bias_report(self, report: Mapping[str, Any]) -> Path:
        """Replace bias_report.json atomically (readers never see half a file)."""
        tmp = self.bias_report_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.bias_report_path)
        return self.bias_report_path

    def read_bias_report(self) -> dict[str, Any]:
        """The last bias_report.json written."""
        return self.files.read_bias_report()

    def read_metrics(self) -> Iterator[dict[str, Any]]:
        """The lines of metrics.jsonl as dictionaries."""
        return self.files.read_metrics()

    def checkpoint_path(self, round_: int) -> Path:
        return self.files.checkpoint(round_)

    def save_checkpoint(
        self, round_: int, state_dict: Mapping[str, torch.Tensor], config: RunConfig
    ) -> Path:
        """Save the global model after ``round_`` (0 is the initial model)."""
        return save_checkpoint(self.checkpoint_path(round_), round_, state_dict, config)

    @property
    def state_path(self) -> Path:
        return self.files.server_state

    def save_state(self, round_: int, strategy: Mapping[str, Any]) -> Path:
        """Record that ``round_`` completed, with the strategy's server-optimiser state."""
        tmp = self.state_path.with_suffix(".tmp")
        torch.save({"round": round_, "strategy": dict(strategy)}, tmp)
        tmp.replace(self.state_path)
        return self.state_path

    def load_state(self) -> dict[str, Any] | None:
        """What ``save_state`` wrote last, or None before the first completed round."""
        if not self.state_path.is_file():
            return None
        return dict(torch.load(self.state_path, map_location="cpu", weights_only=True))
