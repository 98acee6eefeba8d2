"""Binary metrics from mergeable statistics, checked against scikit-learn on the same cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score, roc_auc_score

from radfed.metrics.binary import (
    BinaryStats,
    BinaryStatsAccumulator,
    auc_from_histograms,
    auc_tie_bound,
    binary_metrics,
)
from radfed.metrics.pooling import pool


def _cases(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(rng.normal(0.4 + 0.25 * labels, 0.2), 0, 1)
    return scores, labels


def test_metrics_match_sklearn_on_the_same_cases() -> None:
    # Prepare
    scores, labels = _cases(0, 500)
    # Execute
    stats = BinaryStats.from_scores(scores, labels, threshold=0.5, bins=1000)
    metrics = binary_metrics(stats)
    # Assert
    predicted = (scores >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    assert (stats.tp, stats.fp, stats.tn, stats.fn) == (tp, fp, tn, fn)
    assert metrics["sensitivity"] == pytest.approx(recall_score(labels, predicted), abs=1e-6)
    assert metrics["specificity"] == pytest.approx(
        recall_score(labels, predicted, pos_label=0), abs=1e-6
    )
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)
    bound = auc_tie_bound(stats.pos_hist, stats.neg_hist)
    assert bound is not None and bound < 0.001
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=bound + 1e-6)


def test_pooled_statistics_equal_statistics_of_pooled_cases() -> None:
    # Prepare: three sites with different score distributions
    parts = [_cases(seed, n) for seed, n in ((1, 80), (2, 150), (3, 40))]
    # Execute
    merged = pool((BinaryStats.from_scores(s, y) for s, y in parts), BinaryStats.empty(1000))
    pooled = BinaryStats.from_scores(
        np.concatenate([s for s, _ in parts]), np.concatenate([y for _, y in parts])
    )
    # Assert: exactly equal, counts and histograms
    assert merged == pooled
    site_mean = np.mean([binary_metrics(BinaryStats.from_scores(s, y))["auc"] for s, y in parts])
    exact = roc_auc_score(
        np.concatenate([y for _, y in parts]), np.concatenate([s for s, _ in parts])
    )
    assert binary_metrics(merged)["auc"] == pytest.approx(exact, abs=1e-3)
    assert abs(site_mean - exact) > 1e-3  # averaging per-site AUCs would have been wrong here


def test_accumulator_over_batches_equals_one_pass() -> None:
    scores, labels = _cases(4, 300)
    acc = BinaryStatsAccumulator(threshold=0.3, bins=50)
    for start in range(0, 300, 64):
        acc.append(scores[start : start + 64], labels[start : start + 64])
    assert acc.aggregate() == BinaryStats.from_scores(scores, labels, threshold=0.3, bins=50)
    acc.reset()
    assert acc.aggregate().n == 0


def test_undefined_metrics_are_none_not_nan() -> None:
    stats = BinaryStats.from_scores(np.array([0.2, 0.9]), np.array([1, 1]))
    metrics = binary_metrics(stats)
    assert metrics["auc"] is None and metrics["specificity"] is None
    assert metrics["sensitivity"] == 0.5
    assert binary_metrics(BinaryStats.empty(10))["accuracy"] is None


def test_scores_outside_unit_interval_are_refused() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        BinaryStats.from_scores(np.array([0.2, 1.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="merge"):
        BinaryStats.empty(10) + BinaryStats.empty(20)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=60),
    data=st.data(),
    bins=st.sampled_from([10, 100, 1000]),
)
def test_histogram_auc_is_within_its_tie_bound(
    scores: list[float], data: st.DataObject, bins: int
) -> None:
    labels = data.draw(st.lists(st.integers(0, 1), min_size=len(scores), max_size=len(scores)))
    if len(set(labels)) < 2:
        return
    stats = BinaryStats.from_scores(np.array(scores), np.array(labels), bins=bins)
    auc = auc_from_histograms(stats.pos_hist, stats.neg_hist)
    bound = auc_tie_bound(stats.pos_hist, stats.neg_hist)
    assert auc is not None and bound is not None
    assert abs(auc - roc_auc_score(labels, scores)) <= bound + 1e-12


@settings(max_examples=80, deadline=None)
@given(
    scores=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=80),
    data=st.data(),
    k=st.integers(1, 15),
)
def test_min_cell_policy_hides_small_bins_and_keeps_auc_within_its_bound(
    scores: list[float], data: st.DataObject, k: int
) -> None:
    labels = data.draw(st.lists(st.integers(0, 1), min_size=len(scores), max_size=len(scores)))
    stats = BinaryStats.from_scores(np.array(scores), np.array(labels), bins=100)
    safe = stats.with_min_cell(k)
    if len(scores) < k:
        assert safe.suppressed and safe.n == 0 and not any(safe.pos_hist) and not any(safe.neg_hist)
        return
    totals = [p + q for p, q in zip(safe.pos_hist, safe.neg_hist, strict=True)]
    # each side of the threshold (bin 50) is merged apart; a side of fewer than k cases is
    # one bin, whose count the confusion counts give anyway
    below, above = totals[:50], totals[50:]
    assert all(t == 0 or t >= k or t == stats.tn + stats.fn for t in below)
    assert all(t == 0 or t >= k or t == stats.tp + stats.fp for t in above)
    assert sum(1 for t in below if t) <= max(1, (stats.tn + stats.fn) // k)
    assert sum(1 for t in above if t) <= max(1, (stats.tp + stats.fp) // k)
    assert (safe.tp, safe.fp, safe.tn, safe.fn) == (stats.tp, stats.fp, stats.tn, stats.fn)
    assert sum(safe.pos_hist) == sum(stats.pos_hist) and sum(safe.neg_hist) == sum(stats.neg_hist)
    if len(set(labels)) == 2:
        auc = auc_from_histograms(safe.pos_hist, safe.neg_hist)
        bound = auc_tie_bound(safe.pos_hist, safe.neg_hist)
        assert auc is not None and bound is not None
        assert abs(auc - roc_auc_score(labels, scores)) <= bound + 1e-12


def test_suppressed_cells_stay_out_of_pooled_values() -> None:
    big = BinaryStats.from_scores(*_cases(5, 50))
    small = BinaryStats.from_scores(*_cases(6, 4)).with_min_cell(10)
    assert small.suppressed
    assert pool([big, small], BinaryStats.empty(1000)) == big
    assert binary_metrics(small)["auc"] is None


def test_expected_calibration_error_matches_sklearn_calibration_curve() -> None:
    from sklearn.calibration import calibration_curve

    from radfed.metrics.binary import expected_calibration_error

    # Prepare: an over-confident model on two merged sites
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 2000)
    scores = np.clip(0.5 + (labels - 0.5) * rng.uniform(0.2, 1.0, 2000), 0, 1)
    half = BinaryStats.from_scores(scores[:900], labels[:900], bins=1000)
    rest = BinaryStats.from_scores(scores[900:], labels[900:], bins=1000)
    merged = half + rest
    # Execute
    ece = expected_calibration_error(merged.pos_hist, merged.neg_hist)
    # Assert: scikit-learn's uniform bins on the pooled cases, within half a fine bin
    observed, predicted = calibration_curve(labels, scores, n_bins=10, strategy="uniform")
    counts = np.histogram(scores, bins=np.linspace(0, 1, 11))[0]
    exact = float(np.sum(counts[counts > 0] / len(scores) * np.abs(observed - predicted)))
    assert ece == pytest.approx(exact, abs=0.0005 + 1e-9)
    assert binary_metrics(merged)["ece"] == pytest.approx(ece, abs=1e-6)
    assert expected_calibration_error((0,) * 10, (0,) * 10) is None


def test_no_merged_bin_crosses_the_threshold() -> None:
    # the attack: a run [0.497, 0.503) of 8 cases, cut at 0.5 by the confusion counts
    scores = np.array([0.1] * 20 + [0.4985, 0.4995] + [0.5005] * 6 + [0.9] * 20)
    labels = np.array([0] * 20 + [1, 0] + [0] * 6 + [1] * 20)
    safe = BinaryStats.from_scores(scores, labels, bins=1000).with_min_cell(10)
    totals = np.add(safe.pos_hist, safe.neg_hist)
    edges = np.flatnonzero(totals)
    below = totals[:500].sum()
    assert below == safe.tn + safe.fn and totals[500:].sum() == safe.tp + safe.fp
    assert all(t >= 10 for t in totals[edges])
