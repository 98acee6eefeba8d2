"""The server's strategy: bad replies dropped by site name; metrics from summed statistics."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from sklearn.metrics import roc_auc_score

from radfed.config import RunConfig
from radfed.federation.records import SiteIdentity, pack_classification_stats
from radfed.federation.run_folder import RunFolder
from radfed.federation.strategy import RadfedFedAvg
from radfed.metrics.binary import BinaryStats
from tests.helpers import make_message

CONFIG = RunConfig(num_server_rounds=2, min_sites=1, score_bins=1000, eval_splits=("val",))
REFERENCE = {"w": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0)}


def _strategy(tmp_path: Path) -> RadfedFedAvg:
    run = RunFolder.start(tmp_path / "run", CONFIG)
    return RadfedFedAvg(config=CONFIG, reference=REFERENCE, run=run)


def _train_reply(site: str, node: int, w: float, n: int, *, loss: float = 0.5) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {"w": torch.full((3,), w), "bn.num_batches_tracked": torch.tensor(10)}
            ),
            "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
            "site": SiteIdentity.local(site).to_record(),
        }
    )
    return make_message(content, message_type="train", src_node_id=node)


def test_bad_update_is_dropped_and_the_round_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    strategy = _strategy(tmp_path)
    good_a = _train_reply("site-a", 1, 1.0, 10)
    good_b = _train_reply("site-b", 2, 4.0, 30)
    nan = _train_reply("site-c", 3, float("nan"), 10)
    failed = make_message(RecordDict(), message_type="train", src_node_id=4)
    failed = Message(
        error=Error(code=3002, reason="radfed site error 3002"), metadata=failed.metadata
    )
    caplog.set_level(logging.INFO, logger="radfed")
    # Execute
    arrays, _ = strategy.aggregate_train(1, [good_a, nan, good_b, failed])
    # Assert: weighted by examples over the two good sites only, integer buffer kept integer
    assert arrays is not None
    state = arrays.to_torch_state_dict()
    assert torch.allclose(state["w"], torch.full((3,), (1.0 * 10 + 4.0 * 30) / 40))
    assert state["bn.num_batches_tracked"].dtype == torch.int64
    assert "dropped update from site-c: weight 'w' holds non-finite values" in caplog.text
    assert "node 4 failed with error code 3002" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "round-001.pt").is_file()


def test_no_valid_update_keeps_the_global_model(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    arrays, _ = strategy.aggregate_train(1, [_train_reply("site-a", 1, float("inf"), 10)])
    assert arrays is None
    assert (tmp_path / "run" / "checkpoints" / "round-001.pt").is_file()


def _eval_reply(site: str, node: int, scores: np.ndarray, labels: np.ndarray) -> Message:
    stats = {"val": BinaryStats.from_scores(scores, labels, bins=CONFIG.score_bins)}
    content = RecordDict(
        {"metrics": pack_classification_stats(stats), "site": SiteIdentity.local(site).to_record()}
    )
    return make_message(content, message_type="evaluate", src_node_id=node)


def test_pooled_metrics_come_from_merged_statistics(tmp_path: Path) -> None:
    # Prepare: two sites with different calibration, and one malformed reply
    rng = np.random.default_rng(1)
    y1, y2 = rng.integers(0, 2, 60), rng.integers(0, 2, 90)
    s1 = np.clip(0.2 + 0.3 * y1 + rng.normal(0, 0.1, 60), 0, 1)
    s2 = np.clip(0.5 + 0.3 * y2 + rng.normal(0, 0.1, 90), 0, 1)
    broken = _eval_reply("site-x", 9, s1, y1)
    broken.content["metrics"]["val.tp"] = -5  # type: ignore[index]
    strategy = _strategy(tmp_path)
    # Execute
    summary = strategy.aggregate_evaluate(
        1, [_eval_reply("site-a", 1, s1, y1), broken, _eval_reply("site-b", 2, s2, y2)]
    )
    # Assert
    lines = list(strategy.run.read_metrics())
    assert [(line["site"], line["split"], line["n"]) for line in lines] == [
        ("site-a", "val", 60),
        ("site-b", "val", 90),
        ("ALL", "val", 150),
    ]
    pooled_auc = roc_auc_score(np.concatenate([y1, y2]), np.concatenate([s1, s2]))
    assert lines[2]["metrics"]["auc"] == pytest.approx(pooled_auc, abs=2e-3)
    assert lines[0]["metrics"]["auc"] == pytest.approx(roc_auc_score(y1, s1), abs=2e-3)
    mean_of_sites = (lines[0]["metrics"]["auc"] + lines[1]["metrics"]["auc"]) / 2
    assert abs(mean_of_sites - pooled_auc) > 0.01  # the averaged value would be wrong
    assert summary is not None and summary["val-auc"] == lines[2]["metrics"]["auc"]
