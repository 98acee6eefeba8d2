"""A real Flower simulation, started as its own process: 3 tiny sites, 2 rounds."""

from __future__ import annotations

import itertools
import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from radfed.config import RunConfig
from radfed.data.loading import load_site
from radfed.data.synth import synth_classification
from radfed.federation.checkpoint import load_checkpoint
from radfed.store import find_run, open_store, run_detail, run_events
from radfed.tasks.classification import build_model, predict
from tests.e2e.processes import run_simulate

#: Ray-backed simulations run one at a time, on one pytest-xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray")]
ROUNDS = 2
SITES = ("site-a", "site-b", "site-c")


def _tie_bound(scores: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Half the share of positive-negative pairs in one score bin (computed without radfed)."""
    index = np.minimum((scores * bins).astype(int), bins - 1)
    pos = np.bincount(index[labels == 1], minlength=bins)
    neg = np.bincount(index[labels == 0], minlength=bins)
    return 0.5 * float(np.sum(pos * neg)) / float(pos.sum() * neg.sum())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    data, out = root / "data", root / "run"
    synth_classification(data, sites=3, cases_per_site=30, seed=21, image_size=32)
    output = run_simulate(
        root / "flwr-home",
        "--data",
        str(data),
        "--out",
        str(out),
        "--rounds",
        str(ROUNDS),
        "--seed",
        "5",
        "--run-config",
        # min-cell-size=1: no bins merged, so the AUC can be compared at full resolution
        "image-size=32 local-epochs=2 batch-size=8 min-cell-size=1",
        "--store",
        f"sqlite:///{root / 'runs.sqlite'}",
    )
    assert f"round {ROUNDS}/{ROUNDS} val auc" in output  # progress is shown per round
    # not a terminal: the live display's progress stays plain log lines
    assert f"round {ROUNDS}/{ROUNDS} train: 3 of 3 sites replied after" in output
    return data, out


def test_the_store_holds_the_run_as_it_went(finished_run: tuple[Path, Path]) -> None:
    # Prepare
    _, out = finished_run
    engine = open_store(f"sqlite:///{out.parent / 'runs.sqlite'}")
    lines = (out / "metrics.jsonl").read_text().splitlines()

    # Execute
    detail = run_detail(engine, find_run(engine, "run"))
    kinds = [e["kind"] for e in run_events(engine, detail["id"])]

    # Assert
    assert detail["status"] == "finished" and detail["rounds_done"] == ROUNDS
    assert {s["name"]: (s["state"], s["replies"]) for s in detail["sites"]} == {
        site: ("finished", 1 + 2 * ROUNDS)
        for site in SITES  # the survey, then 2 a round
    }
    phases = [(r["round"], r["phase"], r["asked"], r["replied"]) for r in detail["rounds"]]
    assert phases == [(0, "survey", 3, 3)] + [
        (r, p, 3, 3) for r in range(1, ROUNDS + 1) for p in ("train", "evaluate")
    ]
    assert sum(len(rows) for rows in detail["curves"].values() for rows in rows.values()) == len(
        lines
    )
    assert detail["report"]["versions"] == list(range(ROUNDS + 1))  # every version, 0 too
    assert detail["report"]["has_html"]
    assert kinds[0] == "run-started" and kinds[-1] == "run-finished"
    engine.dispose()


def test_every_site_has_metrics_every_round(finished_run: tuple[Path, Path]) -> None:
    _, out = finished_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {(line["round"], line["site"], line["split"]) for line in lines}
    expected = {
        (r, s, split)
        for r in range(1, ROUNDS + 1)
        for s in (*SITES, "ALL")
        for split in ("train", "val")
    }
    assert keys == expected and len(lines) == len(expected)
    for line in lines:
        # each site's row also says how far leaving it out moves the pooled AUC
        influence = {"auc-influence"} if line["site"] != "ALL" else set()
        assert set(line["metrics"]) == {
            "auc",
            "sensitivity",
            "specificity",
            "accuracy",
            "prevalence",
            "auc_tie_bound",
            "ece",
            *influence,
        }
        assert not influence or 0 <= line["metrics"]["auc-influence"] <= 1
        assert line["suppressed"] is False
    for r in range(1, ROUNDS + 1):
        sites_n = sum(
            line["n"]
            for line in lines
            if line["round"] == r and line["split"] == "val" and line["site"] != "ALL"
        )
        pooled = next(
            line
            for line in lines
            if (line["round"], line["site"], line["split"]) == (r, "ALL", "val")
        )
        assert pooled["n"] == sites_n
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["run-config"]["seed"] == 5 and config["run-config"]["num-server-rounds"] == ROUNDS


def test_global_weights_changed_every_round(finished_run: tuple[Path, Path]) -> None:
    _, out = finished_run
    states = [
        load_checkpoint(out / "checkpoints" / f"round-{r:03d}.pt")["state_dict"]
        for r in range(ROUNDS + 1)
    ]
    for before, after in itertools.pairwise(states):
        assert any(
            not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point()
        )
    tracked = [k for k in states[-1] if k.endswith("num_batches_tracked")]
    assert tracked and all(states[-1][k].dtype == torch.int64 for k in tracked)


def test_pooled_auc_equals_sklearn_on_pooled_cases(finished_run: tuple[Path, Path]) -> None:
    # Prepare: the final global model, and each site's validation cases (split stored at the site)
    data, out = finished_run
    checkpoint = load_checkpoint(out / "checkpoints" / f"round-{ROUNDS:03d}.pt")
    config = RunConfig.from_run_config(checkpoint["run-config"])
    model = build_model(config)
    model.load_state_dict(checkpoint["state_dict"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reported = {
        line["site"]: line for line in lines if line["round"] == ROUNDS and line["split"] == "val"
    }
    scores, labels = [], []
    for site in SITES:
        split = load_site(
            data / site,
            image_size=config.image_size,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        ).splits["val"]
        s, y = predict(model, split), split.labels.numpy()
        assert reported[site]["n"] == len(y)
        if len(set(y)) == 2:
            bound = _tie_bound(s, y, config.score_bins)
            assert reported[site]["metrics"]["auc"] == pytest.approx(
                roc_auc_score(y, s), abs=bound + 1e-5
            )
        scores.append(s)
        labels.append(y)
    # Execute
    pooled_scores, pooled_labels = np.concatenate(scores), np.concatenate(labels)
    exact = roc_auc_score(pooled_labels, pooled_scores)
    bound = _tie_bound(pooled_scores, pooled_labels, config.score_bins)
    # Assert: the stated tolerance is the tie bound of the 1000-bin histograms
    assert bound < 0.05
    assert reported["ALL"]["metrics"]["auc"] == pytest.approx(exact, abs=bound + 1e-5)
    accuracy = float(np.mean((pooled_scores >= config.threshold) == pooled_labels))
    assert reported["ALL"]["metrics"]["accuracy"] == pytest.approx(
        accuracy, abs=1.01 / len(pooled_labels)
    )


def test_fedadam_with_fedbn_runs_end_to_end(tmp_path: Path) -> None:
    # Prepare
    data, out = tmp_path / "data", tmp_path / "run"
    synth_classification(data, sites=2, cases_per_site=20, seed=8, image_size=32)
    # Execute
    run_simulate(
        tmp_path / "flwr-home",
        "--data",
        str(data),
        "--out",
        str(out),
        "--rounds",
        "2",
        "--strategy",
        "fedadam",
        "--run-config",
        "image-size=32 local-epochs=1 fedbn=true min-cell-size=1",
    )
    # Assert: the global model holds no normalisation layer, and each site kept its own
    final = load_checkpoint(out / "checkpoints" / "round-002.pt")["state_dict"]
    assert final and not any("bn" in k or "downsample.1" in k for k in final)
    for site in ("site-a", "site-b"):
        assert list((data / site / ".radfed" / "fedbn").glob("run-*.pt"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(line["round"], line["site"]) for line in lines} >= {
        (2, "site-a"),
        (2, "site-b"),
        (2, "ALL"),
    }


def test_on_a_terminal_a_live_bar_shows_the_round(synth_root: Path, tmp_path: Path) -> None:
    """``radfed simulate`` in a pseudo-terminal, as a user at a shell runs it."""
    # Prepare
    radfed = str(Path(sys.executable).parent / "radfed")
    argv = [
        radfed,
        "simulate",
        "--data",
        str(synth_root),
        "--out",
        str(tmp_path / "run"),
        "--rounds",
        "1",
        "--run-config",
        "image-size=32 local-epochs=1",
    ]
    env = {
        **os.environ,
        "TERM": "xterm-256color",
        "COLUMNS": "120",
        "LINES": "40",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }

    # Execute
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, with the pseudo-terminal as its terminal
        os.execve(radfed, argv, env)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal: it ended
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        done, status = os.waitpid(pid, os.WNOHANG)  # reaps the child if it has ended
        if done == 0:
            os.kill(pid, signal.SIGKILL)  # still running after the deadline: stop it by PID
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    screen = b"".join(chunks).decode(errors="replace")

    # Assert
    assert os.waitstatus_to_exitcode(status) == 0, screen[-3000:]
    assert "round 1/1 train" in screen and "3 of 3 sites replied" in screen
    assert "sites replied after" not in screen  # the bar shows them; no plain progress lines
    assert "bias report:" in screen
