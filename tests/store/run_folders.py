"""Run folders written by hand in the exact formats a run writes, for the store's tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SITES = ("site-a", "site-b", "site-c")


def start(path: Path, *, rounds: int = 3, run_id: str = "f" * 32) -> Path:
    """A run folder as ``RunFolder.start`` leaves it, with the run-started event."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "run-id": run_id,
        "run-config": {"task": "classification", "strategy": "fedavg", "num-server-rounds": rounds},
        "radfed-version": "0.1.0",
        "stats-schema-version": 3,
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("")
    (path / "events.jsonl").write_text("")
    event(path, "run-started", rounds=rounds, sites=list(SITES))
    return path


def event(
    path: Path,
    kind: str,
    *,
    round_: int | None = None,
    site: str | None = None,
    message: str = "",
    level: str = "info",
    **facts: Any,
) -> None:
    line = {
        "at": "2026-12-06T10:00:00.000+00:00",
        "kind": kind,
        "level": level,
        "round": round_,
        "site": site,
        "message": message or kind,
        **facts,
    }
    with (path / "events.jsonl").open("a") as handle:
        handle.write(json.dumps(line) + "\n")


def metrics(path: Path, round_: int, *, auc: float = 0.7) -> None:
    """One round's lines: every site and the pool, val split; ECE undefined (NaN)."""
    with (path / "metrics.jsonl").open("a") as handle:
        for i, site in enumerate((*SITES, "ALL")):
            line = {
                "round": round_,
                "site": site,
                "split": "val",
                "n": 40 + i,
                "suppressed": False,
                "metrics": {"auc": auc + i / 100, "sensitivity": None, "ece": float("nan")},
            }
            handle.write(json.dumps(line) + "\n")


def round_(
    path: Path,
    number: int,
    *,
    replied: tuple[str, ...] = SITES,
    dropped: dict[str, str] | None = None,
    silent: tuple[str, ...] = (),
) -> None:
    """The events and metric lines of one complete round."""
    for phase in ("train", "evaluate"):
        event(path, "phase-started", round_=number, phase=phase, asked=len(SITES))
        event(
            path,
            "phase-ended",
            round_=number,
            phase=phase,
            asked=len(SITES),
            replied=list(replied),
            dropped=dropped or {},
            silent=list(silent),
        )
    metrics(path, number, auc=0.6 + number / 20)
    report(path, number)
    event(path, "report", round_=number)
    event(path, "round-ended", round_=number, seconds=1.0)


def gap(site: str, verdict: str, *, confounded: bool = False) -> dict[str, Any]:
    return {
        "site": site,
        "attribute": "sex",
        "metric": "sensitivity",
        "comparison": "worst vs best",
        "worst": {"group": "F", "value": 0.5, "n": 60},
        "best": {"group": "M", "value": 0.9, "n": 60},
        "difference": {"value": -0.4, "low": -0.55, "high": -0.25},
        "verdict": verdict,
        "flagged": verdict == "flagged",
        "attribution": {"confounded_with_site": confounded},
    }


def report(path: Path, number: int) -> dict[str, Any]:
    """A bias report of format 2 with two cells and two gaps (one flagged)."""
    cells = [
        {
            "site": s,
            "attribute": "sex",
            "group": g,
            "n": 30,
            "suppressed": False,
            "metrics": {"auc": {"value": 0.8, "low": 0.7, "high": 0.9}},
        }
        for s in ("site-b", "ALL")
        for g in ("F", "M")
    ]
    document = {
        "format": "radfed-bias-report",
        "format_version": 2,
        "round": number,
        "rounds": 3,
        "splits": {
            "val": {
                "role": "internal",
                "cells": cells,
                "gaps": [gap("site-b", "flagged"), gap("ALL", "inconclusive")],
            }
        },
        "summary": {
            "counts": {"flagged": 1, "within margin": 0, "inconclusive": 1},
            "largest_inconclusive": [],
            "in_sample_warnings": [],
        },
    }
    (path / "bias_report.json").write_text(json.dumps(document))
    return document
