"""The wire format: statistics and weights round-trip, and broken replies are named and refused."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from radfed.config import RunConfig
from radfed.federation.codes import InvalidReply
from radfed.federation.identity import SiteIdentity, read_site_identity
from radfed.federation.schema import (
    STATS_SCHEMA_VERSION,
    CellStats,
    cell_names,
    pack_stats,
    unpack_cells,
    unpack_stats,
)
from radfed.federation.updates import cast_like, validate_arrays
from radfed.folders import POOLED_SITE
from radfed.metrics.binary import BinaryStats
from radfed.privacy.statistics_dp import noisy_release
from radfed.tasks.classification import TASK

BINS = 20
_CONFIG = RunConfig(score_bins=BINS, eval_splits=("train", "val"))


def _stats() -> dict[str, BinaryStats]:
    rng = np.random.default_rng(0)
    return {
        split: BinaryStats.from_scores(rng.random(30), rng.integers(0, 2, 30), bins=BINS)
        for split in ("train", "val")
    }


def test_statistics_round_trip() -> None:
    stats = _stats()
    record = pack_stats(TASK, stats)
    assert record["num-examples"] == 60 and record["schema-version"] == STATS_SCHEMA_VERSION
    assert unpack_stats(TASK, record, _CONFIG) == stats


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("val.tp"), r"missing \['val\.tp'\], extra \[\]"),
        (lambda r: r.__setitem__("extra", 1), r"missing \[\], extra \['extra'\]"),
        (
            lambda r: r.__setitem__("schema-version", STATS_SCHEMA_VERSION + 1),
            rf"schema-version {STATS_SCHEMA_VERSION + 1}, this server reads {STATS_SCHEMA_VERSION}",
        ),
        (lambda r: r.__setitem__("schema-version", 1.0), "schema-version must be an integer"),
        (lambda r: r.__setitem__("val.fp", -1), "non-negative"),
        (lambda r: r.__setitem__("val.pos-hist", [1] * (BINS - 1)), f"list of {BINS}"),
        (lambda r: r.__setitem__("val.tn", r["val.tn"] + 1), "disagree"),
        (lambda r: r.__setitem__("num-examples", 7), "num-examples"),
        (lambda r: r.__setitem__("val.tp", 2**41), "beyond any plausible count"),
    ],
)
def test_inconsistent_statistics_are_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    record = MetricRecord(dict(pack_stats(TASK, _stats())))
    mutate(record)
    with pytest.raises(InvalidReply, match=message):
        unpack_stats(TASK, record, _CONFIG)


def test_site_identity_and_version_checks() -> None:
    ok = RecordDict({"site": SiteIdentity.local("site-a").to_record()})
    assert read_site_identity(ok).name == "site-a"
    with pytest.raises(InvalidReply, match="no site identity"):
        read_site_identity(RecordDict({}))
    newer_schema = ConfigRecord({"name": "site-b", "radfed-version": "0.1.0", "schema-version": 99})
    with pytest.raises(InvalidReply, match="site 'site-b' sends statistics schema 99"):
        read_site_identity(RecordDict({"site": newer_schema}))
    other_release = ConfigRecord(
        {"name": "site-c", "radfed-version": "0.9.0", "schema-version": STATS_SCHEMA_VERSION}
    )
    with pytest.raises(InvalidReply, match=r"site 'site-c' runs radfed 0\.9\.0"):
        read_site_identity(RecordDict({"site": other_release}))


def test_the_pooled_row_name_is_refused_as_a_site_name() -> None:
    with pytest.raises(InvalidReply, match=f"site name {POOLED_SITE!r} is reserved"):
        read_site_identity(RecordDict({"site": SiteIdentity.local(POOLED_SITE).to_record()}))


def test_weight_checks_name_the_bad_array() -> None:
    reference = {"w": torch.zeros(2, 3), "bn.num_batches_tracked": torch.tensor(4)}
    validate_arrays(ArrayRecord(reference), reference)
    with pytest.raises(InvalidReply, match="'w' holds non-finite"):
        validate_arrays(
            ArrayRecord({**reference, "w": torch.full((2, 3), float("nan"))}), reference
        )
    with pytest.raises(InvalidReply, match="'w' has shape"):
        validate_arrays(ArrayRecord({**reference, "w": torch.zeros(3, 2)}), reference)
    with pytest.raises(InvalidReply, match="'w' has dtype"):
        validate_arrays(
            ArrayRecord({**reference, "w": torch.zeros(2, 3, dtype=torch.float64)}), reference
        )
    with pytest.raises(InvalidReply, match=r"missing \['bn\.num_batches_tracked'\]"):
        validate_arrays(ArrayRecord({"w": torch.zeros(2, 3)}), reference)


def test_weight_checks_measure_the_updates_distance_in_the_same_pass() -> None:
    # Prepare: float32 and float16 tensors (an integer buffer does not count)
    generator = torch.Generator().manual_seed(3)
    reference = {
        "w": torch.randn(40, 30, generator=generator),
        "h": torch.randn(7, generator=generator).half(),
        "bn.num_batches_tracked": torch.tensor(4),
    }
    update = {
        "w": reference["w"] + torch.randn(40, 30, generator=generator),
        "h": (reference["h"].float() + 0.5).half(),
        "bn.num_batches_tracked": torch.tensor(90),
    }
    expected = float(
        torch.linalg.vector_norm(
            torch.cat([(update[k].double() - reference[k].double()).ravel() for k in ("w", "h")])
        )
    )

    # Execute
    norm = validate_arrays(ArrayRecord(update), reference)

    # Assert: torch's norm of the float tensors' differences; the bound uses the same value
    assert norm == pytest.approx(expected, rel=1e-12)
    assert validate_arrays(ArrayRecord(update), reference, max_update_norm=norm * 1.001) == norm
    with pytest.raises(InvalidReply, match="above the bound"):
        validate_arrays(ArrayRecord(update), reference, max_update_norm=norm * 0.999)


def test_weight_checks_use_the_decoded_data_not_the_declared_metadata() -> None:
    # Prepare: bytes of a (2,) float64 array declared as the (3,) float32 the model expects
    reference = {"w": torch.zeros(3)}
    lying = Array(np.ones(2, dtype=np.float64))
    lying.shape, lying.dtype = (3,), "float32"
    wrong_dtype = Array(np.ones(3, dtype=np.float64))
    wrong_dtype.dtype = "float32"
    # Execute / Assert
    with pytest.raises(InvalidReply, match=r"'w' has shape \(2,\), expected \(3,\)"):
        validate_arrays(ArrayRecord({"w": lying}), reference)
    with pytest.raises(InvalidReply, match="'w' has dtype float64, expected float32"):
        validate_arrays(ArrayRecord({"w": wrong_dtype}), reference)


@pytest.mark.parametrize("stype", ["torch.raw", "numpy.ndarray"])
def test_undecodable_weights_are_refused_without_the_cause_text(stype: str) -> None:
    # Prepare: an unknown serialisation type; then numpy bytes that are not a .npy file
    array = Array(np.ones(3, dtype=np.float32))
    array.stype = stype
    if stype == "numpy.ndarray":
        array.data = b"\x93NUMPY garbage"
    # Execute
    with pytest.raises(InvalidReply) as info:
        validate_arrays(ArrayRecord({"w": array}), {"w": torch.zeros(3)})
    # Assert: names the array, quotes neither the stype nor the bytes nor the exception
    assert str(info.value) == "weight 'w' cannot be decoded as a NumPy array"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_update_norm_bound_counts_float_tensors_only() -> None:
    # Prepare: distance sqrt(3 * 2²) ≈ 3.46 over the floats; the integer buffer moves by 1000
    reference = {"w": torch.ones(3), "n": torch.tensor(0)}
    update = ArrayRecord({"w": torch.full((3,), 3.0), "n": torch.tensor(1000)})
    # Execute / Assert
    validate_arrays(update, reference)
    validate_arrays(update, reference, max_update_norm=3.5)
    with pytest.raises(InvalidReply, match=r"update is 3\.46 from the global model .* bound 3\.4"):
        validate_arrays(update, reference, max_update_norm=3.4)


def test_update_norm_overflow_is_refused() -> None:
    reference = {"w": torch.full((2,), -1e308, dtype=torch.float64)}
    update = ArrayRecord({"w": torch.full((2,), 1e308, dtype=torch.float64)})
    with pytest.raises(InvalidReply, match="update is inf from the global model"):
        validate_arrays(update, reference, max_update_norm=1e6)


def test_cast_like_restores_integer_buffers() -> None:
    reference = {"w": torch.zeros(2), "n": torch.tensor(3)}
    averaged = ArrayRecord({"w": torch.ones(2), "n": torch.tensor(4.4, dtype=torch.float64)})
    state = cast_like(averaged, reference)
    assert state["n"].dtype == torch.int64 and int(state["n"]) == 4
    assert state["w"].dtype == torch.float32


def _with_cells(groups: list[tuple[str, str]]) -> tuple[MetricRecord, ConfigRecord, RunConfig]:
    stats = _stats()
    cells = {s: [CellStats(a, g, stats[s], 3) for a, g in groups] for s in stats}
    record = pack_stats(TASK, stats, cells=cells, positives={s: 3 for s in stats})
    config = RunConfig(score_bins=BINS, eval_splits=("train", "val"), subgroups=("sex", "site_x"))
    return MetricRecord(dict(record)), cell_names(cells), config


def test_a_group_outside_a_closed_vocabulary_is_refused() -> None:
    # Prepare: a reply naming sex=Q (no such value) and a free-text group
    good, names, config = _with_cells([("sex", "F"), ("site_x", "anything")])
    bad, bad_names, _ = _with_cells([("sex", "Q")])

    # Execute / Assert: free text may say anything; sex only its own values
    assert len(unpack_cells(TASK, good, names, config)["val"]) == 3
    with pytest.raises(InvalidReply, match="outside its vocabulary"):
        unpack_cells(TASK, bad, bad_names, config)


def test_a_reply_larger_than_its_cells_and_bins_is_refused_before_unpacking() -> None:
    record = MetricRecord(dict(pack_stats(TASK, _stats())))
    record["val.pos-hist"] = [0] * 1_000_000  # a million bins where the run has 20
    with pytest.raises(InvalidReply, match="more values than their cells and bins"):
        unpack_stats(TASK, record, _CONFIG)


def _noisy_reply() -> tuple[MetricRecord, ConfigRecord, dict[str, list[CellStats]]]:
    """A reply as a site with DP statistics sends it: noise heavy enough for negative
    counts in a small cell."""
    rng = random.Random(4)
    stats = _stats()
    cells = {}
    for split, exact in stats.items():
        small = BinaryStats.from_scores(np.array([0.7, 0.2]), np.array([1, 0]), bins=BINS)
        noisy = [noisy_release(exact, 6.0, rng), noisy_release(small, 6.0, rng)]
        cells[split] = [CellStats("all", "all", noisy[0], noisy[0].tp + noisy[0].fn)]
        cells[split].append(CellStats("sex", "F", noisy[1], noisy[1].tp + noisy[1].fn))
    record = pack_stats(
        TASK,
        {s: c[0].stats for s, c in cells.items()},
        cells={s: c[1:] for s, c in cells.items()},
        positives={s: c[0].positives for s, c in cells.items()},
    )
    return MetricRecord(dict(record)), cell_names({s: c[1:] for s, c in cells.items()}), cells


def test_a_noisy_reply_round_trips_with_its_negative_counts_and_noise() -> None:
    # Prepare
    record, names, sent = _noisy_reply()
    config = RunConfig(score_bins=BINS, eval_splits=("train", "val"), subgroups=("sex",))

    # Execute
    received = unpack_cells(TASK, record, names, config)

    # Assert: what the site sent, noise variance and all, negative counts included
    assert received == sent
    assert any(v < 0 for cells in received.values() for c in cells for v in c.stats.pos_hist)  # type: ignore[attr-defined]
    assert {c.stats.noise for cells in received.values() for c in cells} == {36.0}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.__setitem__("val#1.noise-variance", 0.0), "non-negative integer"),
        (lambda r: r.__setitem__("val.noise-variance", -1.0), "noise-variance must be"),
        (lambda r: r.__setitem__("val.noise-variance", float("nan")), "non-finite"),
        (lambda r: r.__setitem__("val.tp", r["val.tp"] + 1), "disagree"),
        (lambda r: r.__setitem__("val.suppressed", 1), "suppressed cell"),
        (lambda r: r.__setitem__("num-examples", r["num-examples"] + 1), "num-examples"),
    ],
)
def test_a_noisy_reply_that_breaks_the_release_rules_is_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    record, names, _ = _noisy_reply()
    config = RunConfig(score_bins=BINS, eval_splits=("train", "val"), subgroups=("sex",))
    mutate(record)
    with pytest.raises(InvalidReply, match=message):
        unpack_cells(TASK, record, names, config)


def test_noisy_confusion_counts_that_are_not_the_sums_of_their_bins_are_refused() -> None:
    # a server-side check that keeps a noisy cell's counts consistent with its histograms
    record, names, _ = _noisy_reply()
    config = RunConfig(score_bins=BINS, eval_splits=("train", "val"), subgroups=("sex",))
    record["val.tp"] = record["val.tp"] + 1  # type: ignore[operator]
    record["val.fn"] = record["val.fn"] - 1  # type: ignore[operator]
    with pytest.raises(InvalidReply, match="sums of the noisy bins"):
        unpack_cells(TASK, record, names, config)


def test_noisy_and_exact_cells_in_one_split_are_refused() -> None:
    # an exact cell beside noisy ones would say which counts carry no noise
    record, names, _ = _noisy_reply()
    config = RunConfig(score_bins=BINS, eval_splits=("train", "val"), subgroups=("sex",))
    exact = BinaryStats.from_scores(np.array([0.7, 0.2]), np.array([1, 0]), bins=BINS)
    for key, value in TASK.to_values(exact).items():
        record[f"val#1.{key}"] = value
    record["val#1.positives"] = 1
    with pytest.raises(InvalidReply, match="noisy and exact cells"):
        unpack_cells(TASK, record, names, config)


def _exact_stats() -> dict[str, BinaryStats]:
    """A site's cells with exact Mann-Whitney parts and per-patient sums (2 images each)."""
    rng = np.random.default_rng(1)
    out = {}
    for split in ("train", "val"):
        scores, labels = rng.random(60), (rng.random(60) < 0.5).astype(int)
        patients = [str(i // 2) for i in range(60)]
        stats = BinaryStats.from_scores(scores, labels, bins=BINS, exact=True, patients=patients)
        out[split] = stats.with_min_cell(5)
    return out


def test_exact_counts_and_per_patient_sums_round_trip() -> None:
    # Prepare
    stats = _exact_stats()
    # Execute
    record = pack_stats(TASK, stats)
    received = unpack_stats(TASK, record, _CONFIG)
    # Assert: sent, and read back as they left
    assert record["val.auc-exact"] == 1 and record["val.auc-mw2"] == stats["val"].exact.mw2
    assert record["val.sens-clusters"][0] > 0 and record["val.auc-clusters"][0] > 0  # type: ignore[index]
    assert received == stats
    assert received["val"].exact.pairs == (stats["val"].tp + stats["val"].fn) * (
        stats["val"].tn + stats["val"].fp
    )


def _pairs(r: MetricRecord) -> int:
    return (r["val.tp"] + r["val.fn"]) * (r["val.tn"] + r["val.fp"])  # type: ignore[operator,no-any-return]


def _set_item(key: str, index: int, value: object):  # type: ignore[no-untyped-def]
    def mutate(r: MetricRecord) -> None:
        values = list(r[key])  # type: ignore[arg-type]
        values[index] = value
        r[key] = values

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.__setitem__("val.auc-mw2", 2 * _pairs(r) + 1), "exceeds the pairs"),
        (lambda r: r.__setitem__("val.auc-mw2", -1), "non-negative integer"),
        (lambda r: r.__setitem__("val.auc-exact", 2), "auc-exact must be 0 or 1"),
        (lambda r: r.__setitem__("val.auc-exact", 0), "must be 0 without auc-exact"),
        (lambda r: r.__setitem__("val.auc-v10-sq", -1.0), "finite numbers >= 0"),
        (lambda r: r.__setitem__("val.auc-v01-sq", 1e6), "outside the range"),
        (_set_item("val.sens-clusters", 0, 10_000), "more patients than images"),
        (_set_item("val.sens-clusters", 1, -3), "non-negative integer"),
        (_set_item("val.spec-clusters", 3, 10**8), "cannot have"),
        (_set_item("val.auc-clusters", 1, 10_000), "more patients than images"),
        (_set_item("val.auc-cluster-sums", 0, 1e9), "cannot have"),
        (_set_item("val.auc-cluster-sums", 4, -1.0), "finite numbers >= 0"),
        (_set_item("val.auc-cluster-sums", 2, float("inf")), "non-finite"),
    ],
)
def test_inconsistent_exact_counts_or_patient_sums_are_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    record = MetricRecord(dict(pack_stats(TASK, _exact_stats())))
    mutate(record)
    with pytest.raises(InvalidReply, match=message):
        unpack_stats(TASK, record, _CONFIG)


def test_a_noisy_cell_with_an_exact_count_is_refused() -> None:
    record, names, _ = _noisy_reply()
    config = RunConfig(score_bins=BINS, eval_splits=("train", "val"), subgroups=("sex",))
    record["val.auc-exact"] = 1
    record["val.auc-mw2"] = 1
    with pytest.raises(InvalidReply, match="noisy statistics carry no exact count"):
        unpack_cells(TASK, record, names, config)
