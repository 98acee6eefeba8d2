"""The wire format: statistics and weights round-trip, and broken replies are named and refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from radfed import STATS_SCHEMA_VERSION
from radfed.federation.records import (
    InvalidReply,
    SiteIdentity,
    cast_like,
    pack_classification_stats,
    read_site_identity,
    unpack_classification_stats,
    validate_arrays,
)
from radfed.metrics.binary import BinaryStats

BINS = 20


def _stats() -> dict[str, BinaryStats]:
    rng = np.random.default_rng(0)
    return {
        split: BinaryStats.from_scores(rng.random(30), rng.integers(0, 2, 30), bins=BINS)
        for split in ("train", "val")
    }


def test_statistics_round_trip() -> None:
    stats = _stats()
    record = pack_classification_stats(stats)
    assert record["num-examples"] == 60 and record["schema-version"] == STATS_SCHEMA_VERSION
    assert unpack_classification_stats(record, ("train", "val"), BINS) == stats


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("val.tp"), "missing"),
        (lambda r: r.__setitem__("extra", 1), "extra"),
        (lambda r: r.__setitem__("val.fp", -1), "non-negative"),
        (lambda r: r.__setitem__("val.pos-hist", [1] * (BINS - 1)), f"list of {BINS}"),
        (lambda r: r.__setitem__("val.tn", r["val.tn"] + 1), "disagree"),
        (lambda r: r.__setitem__("num-examples", 7), "num-examples"),
    ],
)
def test_inconsistent_statistics_are_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    record = MetricRecord(dict(pack_classification_stats(_stats())))
    mutate(record)
    with pytest.raises(InvalidReply, match=message):
        unpack_classification_stats(record, ("train", "val"), BINS)


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
    with pytest.raises(InvalidReply, match="missing"):
        validate_arrays(ArrayRecord({"w": torch.zeros(2, 3)}), reference)


def test_cast_like_restores_integer_buffers() -> None:
    reference = {"w": torch.zeros(2), "n": torch.tensor(3)}
    averaged = ArrayRecord({"w": torch.ones(2), "n": torch.tensor(4.4, dtype=torch.float64)})
    state = cast_like(averaged, reference)
    assert state["n"].dtype == torch.int64 and int(state["n"]) == 4
    assert state["w"].dtype == torch.float32
