"""The server's strategy: bad replies dropped by site name; metrics from summed statistics."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from sklearn.metrics import roc_auc_score

from radfed.central.run_folder import RunFolder
from radfed.central.strategy import RadfedFedAvg
from radfed.config import RunConfig
from radfed.federation.identity import SiteIdentity
from radfed.federation.packing import PACKED, pack
from radfed.federation.schema import STATS_SCHEMA_VERSION, pack_stats
from radfed.metrics.binary import BinaryStats
from radfed.tasks.classification import TASK
from tests.helpers import make_message

CONFIG = RunConfig(num_server_rounds=2, min_sites=1, score_bins=1000, eval_splits=("val",))
REFERENCE = {"w": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0)}


def _strategy(tmp_path: Path, **bounds: Any) -> RadfedFedAvg:
    run = RunFolder.start(tmp_path / "run", CONFIG)
    return RadfedFedAvg(config=CONFIG, reference=REFERENCE, run=run, **bounds)


def _train_reply(
    site: str,
    node: int,
    w: float,
    n: int,
    *,
    loss: float = 0.5,
    metrics: dict[str, int | float | list[int] | list[float]] | None = None,
    arrays: ArrayRecord | None = None,
    extra: dict[str, ArrayRecord | MetricRecord] | None = None,
) -> Message:
    content = RecordDict(
        {
            "arrays": arrays
            or pack({"w": torch.full((3,), w), "bn.num_batches_tracked": torch.tensor(10)}),
            "metrics": MetricRecord(metrics or {"num-examples": n, "train-loss": loss}),
            "site": SiteIdentity.local(site).to_record(),
        }
    )
    for key, record in (extra or {}).items():
        content[key] = record
    return make_message(content, message_type="train", src_node_id=node)


def _flat() -> np.ndarray:
    """The packed bytes of a good update (20: ``w`` 3 x 4, the int64 buffer 8)."""
    return pack({"w": torch.ones(3), "bn.num_batches_tracked": torch.tensor(10)})[PACKED].numpy()


def _packed(array: Array, **more: Array) -> ArrayRecord:
    return ArrayRecord({PACKED: array, **more})


def _lying_arrays() -> ArrayRecord:
    """Bytes of a (20,) float64 array declared as the (20,) uint8 array expected."""
    packed = Array(np.ones(20, dtype=np.float64))
    packed.dtype = "uint8"
    return _packed(packed)


def _undecodable_arrays() -> ArrayRecord:
    packed = Array(_flat())
    packed.stype = "torch.raw"
    return _packed(packed)


def _truncated_arrays() -> ArrayRecord:
    """The serialized bytes of the packed array, cut short (a transfer that broke off)."""
    packed = Array(_flat())
    return _packed(Array(packed.dtype, packed.shape, packed.stype, packed.data[:-3]))


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
        {"metrics": pack_stats(TASK, stats), "site": SiteIdentity.local(site).to_record()}
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


@pytest.mark.parametrize(
    ("make_bad", "reason"),
    [
        (
            lambda: _train_reply(
                "site-b", 2, 9.0, 10, metrics={"num-examples": 10, "train-loss": 0.5, "x": 1}
            ),
            r"metric keys differ \(missing \[\], extra \['x'\]\)",
        ),
        (
            lambda: _train_reply(
                "site-b", 2, 9.0, 10, extra={"m2": MetricRecord({"num-examples": 1})}
            ),
            r"exactly one MetricRecord named 'metrics', got 2 \['m2', 'metrics'\]",
        ),
        (
            lambda: _train_reply("site-b", 2, 9.0, 10, extra={"a2": pack({"w": torch.ones(3)})}),
            r"exactly one ArrayRecord named 'arrays', got 2 \['a2', 'arrays'\]",
        ),
        (
            lambda: _train_reply(
                "site-b", 2, 9.0, 10, extra={"arrays": MetricRecord({"num-examples": 1})}
            ),
            r"exactly one ArrayRecord named 'arrays', got 0 \[\]",
        ),
        (
            lambda: _train_reply("site-b", 2, 9.0, 10, arrays=_lying_arrays()),
            "the packed weights must be a 1-D uint8 array",
        ),
        (
            lambda: _train_reply("site-b", 2, 9.0, 10, arrays=_undecodable_arrays()),
            "the packed weights cannot be decoded as a NumPy array",
        ),
        (
            lambda: _train_reply("site-b", 2, 9.0, 10, arrays=_truncated_arrays()),
            "the packed weights' header declares 20 bytes, 17 follow it",
        ),
        (
            lambda: _train_reply("site-b", 2, 9.0, 10, arrays=_packed(Array(_flat()[:-1]))),
            r"the packed weights hold 19 bytes, the model needs 20 \(2 tensors\)",
        ),
        (
            lambda: _train_reply(
                "site-b", 2, 9.0, 10, arrays=_packed(Array(np.append(_flat(), np.uint8(0))))
            ),
            r"the packed weights hold 21 bytes, the model needs 20 \(2 tensors\)",
        ),
        (
            lambda: _train_reply(
                "site-b", 2, 9.0, 10, arrays=_packed(Array(_flat().view(np.int8)))
            ),
            "the packed weights must be a 1-D uint8 array",
        ),
        (
            lambda: _train_reply(
                "site-b", 2, 9.0, 10, arrays=_packed(Array(_flat().reshape(4, 5)))
            ),
            "the packed weights must be a 1-D uint8 array",
        ),
        (
            lambda: _train_reply(
                "site-b", 2, 9.0, 10, arrays=_packed(Array(_flat()), layout=Array(np.zeros(2)))
            ),
            r"weights must travel as one packed array 'packed', got 2 arrays",
        ),
        (
            lambda: _train_reply(
                "site-b",
                2,
                9.0,
                10,
                arrays=ArrayRecord(
                    {"w": torch.full((3,), 9.0), "bn.num_batches_tracked": torch.tensor(10)}
                ),
            ),
            r"weights must travel as one packed array 'packed', got 2 arrays",
        ),
        (
            lambda: _train_reply("site-b", 2, 1e6, 10**12),
            r"num-examples 1000000000000 is above the bound 10000000",
        ),
    ],
    ids=[
        "extra-metric-key",
        "two-metric-records",
        "two-array-records",
        "no-array-record",
        "decoded-dtype-differs",
        "unknown-stype",
        "truncated-serialization",
        "one-byte-short",
        "one-byte-long",
        "wrong-dtype",
        "two-dimensional",
        "two-arrays",
        "named-not-packed",
        "huge-num-examples",
    ],
)
def test_malformed_update_is_dropped_without_failing_the_round(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    make_bad: Callable[[], Message],
    reason: str,
) -> None:
    # Prepare
    strategy = _strategy(tmp_path)
    caplog.set_level(logging.INFO, logger="radfed")
    # Execute: Flower's consistency check runs on what the strategy accepted
    arrays, metrics = strategy.aggregate_train(
        1, [_train_reply("site-a", 1, 1.0, 10), make_bad(), _train_reply("site-c", 3, 4.0, 30)]
    )
    # Assert: the two good sites are averaged, the bad one is dropped by name
    assert arrays is not None and metrics is not None
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), 13.0 / 4))
    assert dict(metrics) == {"train-loss": pytest.approx(0.5)}
    dropped = [r.getMessage() for r in caplog.records if "dropped update" in r.getMessage()]
    assert len(dropped) == 1 and "dropped update from site-b: " in dropped[0]
    assert re.search(reason, dropped[0])
    assert "Unsupported" not in caplog.text  # no exception text


def test_an_update_beyond_the_norm_bound_is_clipped_to_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: bound 5; site-b's update w=4 (in 3 dimensions) is 6.93 from the model at 0
    strategy = _strategy(tmp_path, max_update_norm=5.0)
    caplog.set_level(logging.INFO, logger="radfed")

    # Execute: equal weights, so the mean shows what each update counted for
    arrays, _ = strategy.aggregate_train(
        1, [_train_reply("site-a", 1, 1.0, 10), _train_reply("site-b", 2, 4.0, 10)]
    )

    # Assert: site-b counted as its direction at norm 5 (w = 5 / sqrt(3)), not dropped
    assert arrays is not None
    clipped = 5.0 / math.sqrt(3)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), (1.0 + clipped) / 2))
    assert "round 1: clipped the update of site-b from 6.93 to the bound 5 (L2)" in caplog.text
    assert "site-a from" not in caplog.text


def test_without_a_bound_the_first_round_calibrates_it(tmp_path: Path) -> None:
    # Prepare: three honest updates of norm ~1.7, and in round 2 one 100 times larger
    strategy = _strategy(tmp_path)
    honest = [_train_reply(f"site-{s}", i, 1.0, 10) for i, s in enumerate("abc", start=1)]
    strategy.aggregate_train(1, honest)  # the model moves to w = 1
    attack = [_train_reply("site-a", 1, 1.0, 10), _train_reply("site-b", 2, 101.0, 10)]

    # Execute
    arrays, _ = strategy.aggregate_train(2, attack)

    # Assert: bound 3 x the first round's median norm (sqrt(3)); b moved by at most that
    assert strategy.calibrated_norm == pytest.approx(3 * math.sqrt(3))
    moved = arrays.to_torch_state_dict()["w"] - 1.0  # type: ignore[union-attr]
    assert float(moved.norm()) <= strategy.calibrated_norm / 2 + 1e-5


def test_num_examples_is_capped_at_the_sites_train_split(tmp_path: Path) -> None:
    # Prepare: site-b's statistics say its train split holds 30 cases; it claims 10 million
    strategy = _strategy(tmp_path, max_update_norm=1e6)
    strategy.train_sizes["site-b"] = 30

    # Execute
    arrays, _ = strategy.aggregate_train(
        1, [_train_reply("site-a", 1, 1.0, 30), _train_reply("site-b", 2, 4.0, 10_000_000)]
    )

    # Assert: weighted 30 : 30, not 30 : 10,000,000
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), 2.5))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bounds",
    [{"max_update_norm": 0.0}, {"max_update_norm": float("nan")}, {"max_examples": 0}],
)
def test_bounds_must_be_positive(tmp_path: Path, bounds: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"^max_\w+ must be (a )?positive"):
        _strategy(tmp_path, **bounds)


def test_second_reply_from_the_same_site_name_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    strategy = _strategy(tmp_path)
    caplog.set_level(logging.INFO, logger="radfed")
    # Execute: another node claims site-a's name
    arrays, _ = strategy.aggregate_train(
        1, [_train_reply("site-a", 1, 1.0, 10), _train_reply("site-a", 2, 9.0, 90)]
    )
    # Assert: the first reply alone makes the model
    assert arrays is not None
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.ones(3))
    assert (
        "round 1: dropped update from site-a (node 2): this round already has a reply "
        "from that site name" in caplog.text
    )
    assert strategy.site_names == {1: "site-a"}


def test_duplicate_and_reserved_site_names_do_not_reach_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: site-a twice (10 then 30 cases) and a site calling itself "ALL" (20 cases)
    def reply(site: str, node: int, n: int) -> Message:
        return _eval_reply(site, node, np.linspace(0, 1, n), np.arange(n) % 2)

    strategy = _strategy(tmp_path)
    caplog.set_level(logging.INFO, logger="radfed")
    # Execute
    strategy.aggregate_evaluate(
        1, [reply("site-a", 1, 10), reply("site-a", 2, 30), reply("ALL", 3, 20)]
    )
    # Assert: only the first site-a reply, and the pooled row is the true pool
    lines = [(line["site"], line["n"]) for line in strategy.run.read_metrics()]
    assert lines == [("site-a", 10), ("ALL", 10)]
    assert "dropped statistics from site-a (node 2)" in caplog.text
    assert "dropped statistics from node 3: site name 'ALL' is reserved" in caplog.text


def test_statistics_of_another_schema_or_shape_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    rng = np.random.default_rng(2)
    y, s = rng.integers(0, 2, 40), rng.random(40)
    other_schema = _eval_reply("site-b", 2, s, y)
    other_schema.content.metric_records["metrics"]["schema-version"] = STATS_SCHEMA_VERSION + 1
    two_records = _eval_reply("site-c", 3, s, y)
    two_records.content["more"] = MetricRecord({"num-examples": 1})
    huge = _eval_reply("site-d", 4, s, y)
    strategy = _strategy(tmp_path, max_examples=39)
    strategy_ok = _strategy(tmp_path / "ok")
    caplog.set_level(logging.INFO, logger="radfed")
    # Execute
    summary = strategy_ok.aggregate_evaluate(
        1, [_eval_reply("site-a", 1, s, y), other_schema, two_records]
    )
    none = strategy.aggregate_evaluate(1, [huge])
    # Assert
    assert summary is not None
    assert [line["site"] for line in strategy_ok.run.read_metrics()] == ["site-a", "ALL"]
    assert (
        f"dropped statistics from site-b: statistics schema-version {STATS_SCHEMA_VERSION + 1}, "
        f"this server reads {STATS_SCHEMA_VERSION}" in caplog.text
    )
    assert "dropped statistics from site-c: reply must carry exactly one MetricRecord" in (
        caplog.text
    )
    assert none is None
    assert "dropped statistics from site-d: num-examples 40 is above the bound 39" in caplog.text


def test_suppressed_site_is_reported_as_such_and_left_out_of_the_pool(tmp_path: Path) -> None:
    # Prepare: site-b has 5 validation cases under a minimum cell size of 10
    rng = np.random.default_rng(3)
    y1, y2 = rng.integers(0, 2, 40), rng.integers(0, 2, 5)
    s1, s2 = rng.random(40), rng.random(5)
    small = BinaryStats.from_scores(s2, y2, bins=CONFIG.score_bins).with_min_cell(10)
    content = RecordDict(
        {
            "metrics": pack_stats(TASK, {"val": small}),
            "site": SiteIdentity.local("site-b").to_record(),
        }
    )
    strategy = _strategy(tmp_path)
    # Execute
    strategy.aggregate_evaluate(
        1,
        [
            _eval_reply("site-a", 1, s1, y1),
            make_message(content, message_type="evaluate", src_node_id=2),
        ],
    )
    # Assert
    lines = {line["site"]: line for line in strategy.run.read_metrics()}
    assert lines["site-b"]["suppressed"] is True and lines["site-b"]["n"] is None
    assert lines["site-b"]["metrics"]["auc"] is None
    assert lines["ALL"]["n"] == 40 and lines["ALL"]["metrics"] == lines["site-a"]["metrics"]
