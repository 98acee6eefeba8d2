"""A run folder written by hand in the exact formats a run writes, synced into a fresh store."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from radfed.dashboard import create_app
from radfed.store import open_store, sync_run

with warnings.catch_warnings():  # Starlette's notice that its test client will move to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

RUN_ID = "0123456789abcdef0123456789abcdef"
#: A site name that would run as script if any page parsed store text as HTML.
HOSTILE_SITE = "<script>alert('x')</script>"
SITES = ("site-a", "site-b", HOSTILE_SITE)
ROUNDS = 2
TOKEN = "a-long-enough-dashboard-token-0123"
LOOPBACK = "http://127.0.0.1"


def _event(kind: str, *, round_: int | None = None, site: str | None = None, **facts: Any) -> str:
    line = {
        "at": "2026-12-06T10:00:00.000+00:00",
        "kind": kind,
        "level": facts.pop("level", "info"),
        "round": round_,
        "site": site,
        "message": facts.pop("message", kind),
        **facts,
    }
    return json.dumps(line)


def _metric(round_: int, site: str, split: str, n: int | None, auc: float | None) -> str:
    suppressed = n is None
    values: dict[str, float | None] = {
        "auc": auc,
        "sensitivity": None if suppressed else 0.5 + round_ / 10,
        "ece": float("nan") if site == "site-a" else 0.1,
    }
    line = {"round": round_, "site": site, "split": split, "n": n, "suppressed": suppressed}
    return json.dumps({**line, "metrics": values})


def _gap(site: str, verdict: str, *, confounded: bool) -> dict[str, Any]:
    return {
        "site": site,
        "attribute": "sex*age_band",
        "metric": "sensitivity",
        "comparison": "worst vs best",
        "worst": {"group": "F|60-79", "value": 0.31, "n": 115},
        "best": {"group": "M|60-79", "value": 0.86, "n": 104},
        "difference": {"value": -0.55, "low": -0.8, "high": -0.24},
        "p_value": 1e-4,
        "margin": 0.05,
        "confidence": 0.99,
        "verdict": verdict,
        "flagged": verdict == "flagged",
        "reason": verdict,
        "cases_needed": None,
        "attribution": {"confounded_with_site": confounded, "drivers": []},
    }


def write_run(path: Path) -> Path:
    """A finished two-round run of three sites (one named like a script), with a bias
    report that flags one gap, and its HTML report."""
    path.mkdir(parents=True)
    config = {
        "run-id": RUN_ID,
        "run-config": {
            "task": "classification",
            "strategy": "fedavg",
            "num-server-rounds": ROUNDS,
            "bias-margin": 0.05,
            "seed": 3,
        },
        "radfed-version": "0.1.0",
        "stats-schema-version": 3,
    }
    (path / "config.json").write_text(json.dumps(config))
    events = [_event("run-started", rounds=ROUNDS, sites=list(SITES))]
    metrics = []
    for r in range(1, ROUNDS + 1):
        for phase in ("train", "evaluate"):
            events.append(_event("phase-started", round_=r, phase=phase, asked=len(SITES)))
            events.append(
                _event(
                    "phase-ended",
                    round_=r,
                    phase=phase,
                    asked=len(SITES),
                    replied=list(SITES),
                    dropped={},
                    silent=[],
                )
            )
        for i, site in enumerate(SITES):
            metrics.append(_metric(r, site, "val", 40 + i, 0.6 + r / 10 + i / 100))
        metrics.append(_metric(r, "site-a", "train", None, None))  # suppressed
        metrics.append(_metric(r, "ALL", "val", 123, 0.65 + r / 10))
        events.append(_event("round-ended", round_=r, message=f"round {r}/{ROUNDS} completed"))
    refusal = _event(
        "site-error",
        round_=1,
        site="site-b",
        code=3005,
        refusal=True,
        level="warning",
        message="site-b refused: query budget spent",
    )
    events.insert(3, refusal)
    events.append(_event("run-finished", message=f"run finished: {ROUNDS} rounds"))
    (path / "events.jsonl").write_text("\n".join(events) + "\n")
    (path / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    report = {
        "format": "radfed-bias-report",
        "format_version": 2,
        "round": ROUNDS,
        "rounds": ROUNDS,
        "splits": {
            "val": {
                "role": "internal",
                "cells": [],
                "gaps": [
                    _gap("site-b", "flagged", confounded=False),
                    _gap("ALL", "inconclusive", confounded=True),
                    _gap("site-a", "within margin", confounded=False),
                ],
            }
        },
        "summary": {
            "counts": {"flagged": 1, "within margin": 1, "inconclusive": 1},
            "largest_inconclusive": [],
            "in_sample_warnings": [],
        },
    }
    (path / "bias_report.json").write_text(json.dumps(report))
    (path / "bias_report.html").write_text(
        "<!DOCTYPE html><html><head><style>h1{color:#222}</style></head>"
        "<body><h1>radfed bias report</h1></body></html>"
    )
    return path


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A store holding the hand-written run."""
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    sync_run(store, write_run(tmp_path / "run-one"))
    yield store
    store.dispose()


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    """The dashboard without a token, addressed as this machine."""
    with TestClient(create_app(engine), base_url=LOOPBACK) as test_client:
        yield test_client
