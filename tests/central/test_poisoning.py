"""One site tries to steer the federation: a poisoned update with a huge claimed example count,
and fabricated statistics. Robust strategies keep the global model near the honest aggregate;
the server names the site."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from radfed.central.run_folder import RunFolder
from radfed.central.strategy import make_strategy
from radfed.config import RunConfig
from radfed.federation.identity import SiteIdentity
from radfed.federation.packing import pack
from radfed.federation.schema import pack_stats
from radfed.metrics.binary import BinaryStats
from radfed.tasks.classification import TASK
from tests.helpers import make_message

DIM, HONEST = 64, 7
#: How far from the honest sites' mean a robust strategy may end, as a share of the
#: distance the attacker's update has from it.
STATED = 0.25


def _reply(site: str, node: int, w: np.ndarray, n: int) -> Message:
    content = RecordDict(
        {
            "arrays": pack({"w": torch.from_numpy(w.astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
            "site": SiteIdentity.local(site).to_record(),
        }
    )
    return make_message(content, message_type="train", src_node_id=node)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_a_poisoned_update_does_not_steer_a_robust_strategy(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: seven honest sites near w = 1; the attacker claims 10,000,000 examples and
    # sends an update at the norm bound toward a target of its choosing
    rng = np.random.default_rng(0)
    config = RunConfig(strategy=name, robust_f=1, min_sites=HONEST + 1, eval_splits=("val",))
    reference = {"w": torch.zeros(DIM)}
    bound = 3.0 * np.sqrt(DIM)
    strategy = make_strategy(
        config, reference, RunFolder.start(tmp_path / "run", config), max_update_norm=bound
    )
    honest = [1.0 + 0.1 * rng.standard_normal(DIM) for _ in range(HONEST)]
    target = np.full(DIM, -1.0)
    poisoned = bound * target / np.linalg.norm(target)
    replies = [_reply(f"site-{i}", i + 1, w, 100) for i, w in enumerate(honest)]
    replies.append(_reply("mallory", 99, poisoned, 10_000_000))
    caplog.set_level(logging.INFO, logger="radfed")

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: the global model is within the stated share of the attack's reach of the
    # honest mean (FedAvg would follow the attacker almost entirely)
    assert arrays is not None
    got = arrays.to_torch_state_dict()["w"].numpy()
    mean = np.mean(honest, axis=0)
    assert np.linalg.norm(got - mean) <= STATED * np.linalg.norm(poisoned - mean)


def test_fedavg_with_radfeds_bounds_limits_the_same_attack_and_names_the_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the same attack against FedAvg; the attacker's train split holds 100 cases
    rng = np.random.default_rng(0)
    config = RunConfig(min_sites=HONEST + 1, eval_splits=("val",))
    strategy = make_strategy(
        config, {"w": torch.zeros(DIM)}, RunFolder.start(tmp_path / "r", config)
    )
    strategy.train_sizes["mallory"] = 100  # type: ignore[attr-defined]
    honest = [1.0 + 0.1 * rng.standard_normal(DIM) for _ in range(HONEST)]
    replies = [_reply(f"site-{i}", i + 1, w, 100) for i, w in enumerate(honest)]
    replies.append(_reply("mallory", 99, np.full(DIM, -50.0), 10_000_000))
    caplog.set_level(logging.INFO, logger="radfed")

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: capped at its train split and clipped to 3 x the median norm, the attacker
    # counts as one site of eight; the log names it for both
    got = arrays.to_torch_state_dict()["w"].numpy()  # type: ignore[union-attr]
    mean = np.mean(honest, axis=0)
    bound = strategy.calibrated_norm  # type: ignore[attr-defined]
    assert bound <= 3 * max(np.linalg.norm(w) for w in honest)  # the median is an honest one
    # got - mean = (clipped - mean) / 8, and the clipped update is within the bound
    assert np.linalg.norm(got - mean) <= (bound + np.linalg.norm(mean)) / (HONEST + 1) + 1e-4
    assert "mallory reported 10000000 training examples, its train split holds 100" in caplog.text
    assert "clipped the update of mallory" in caplog.text


def test_fabricated_statistics_are_named_by_their_influence_on_the_pool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: three honest sites with a good model; a fourth reports 100,000 cases scored
    # exactly wrong (it would drive the pooled AUC towards 0)
    rng = np.random.default_rng(2)
    config = RunConfig(min_sites=4, eval_splits=("val",), score_bins=1000)
    strategy = make_strategy(config, {"w": torch.zeros(3)}, RunFolder.start(tmp_path / "r", config))
    replies = []
    for node, site in enumerate(("a", "b", "c"), start=1):
        labels = rng.integers(0, 2, 200)
        scores = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.1, 200), 0, 1)
        replies.append(_eval(site, node, BinaryStats.from_scores(scores, labels, bins=1000)))
    labels = rng.integers(0, 2, 100_000)
    replies.append(_eval("mallory", 9, BinaryStats.from_scores(1.0 - labels, labels, bins=1000)))
    caplog.set_level(logging.INFO, logger="radfed")

    # Execute
    strategy.aggregate_evaluate(1, replies)

    # Assert: the site is named with how far it moves the pooled AUC; the honest ones not
    assert "leaving mallory out moves the pooled auc by" in caplog.text
    assert not any(f"leaving {s} out" in caplog.text for s in ("a", "b", "c"))
    rows = [r for r in strategy.run.read_metrics() if r["site"] == "mallory"]  # type: ignore[attr-defined]
    assert rows[0]["metrics"]["auc-influence"] > 0.5


def _eval(site: str, node: int, stats: BinaryStats) -> Message:
    content = RecordDict(
        {
            "metrics": pack_stats(TASK, {"val": stats}, positives={"val": stats.tp + stats.fn}),
            "site": SiteIdentity.local(site).to_record(),
        }
    )
    return make_message(content, message_type="evaluate", src_node_id=node)
