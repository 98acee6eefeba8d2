"""Exact within-site AUC: the site's Mann-Whitney count and DeLong sums, pooled with the bins."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from radfed.bias.estimates import compare, estimates, interval, is_exact, tie_bound
from radfed.metrics.binary import (
    BinaryStats,
    auc_from_histograms,
    auc_tie_bound,
    auc_with_bound,
    binary_metrics,
)
from radfed.metrics.exact_auc import exact_delong_variance
from radfed.metrics.pooling import pool


def _cases(seed: int, n: int, shift: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    # scores rounded to 0.01: many exact ties between positives and negatives
    scores = np.round(np.clip(rng.normal(0.4 + shift * labels, 0.2), 0, 1), 2)
    return scores, labels


def _delong_reference(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) from the cases: placement values by pairwise comparison."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    auc = float(psi.mean())
    return auc, float(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)


def test_exact_site_auc_equals_sklearn_and_its_variance_equals_delong_on_the_cases() -> None:
    # Prepare: a site's cell, bins merged for k = 10
    scores, labels = _cases(0, 300)
    # Execute
    sent = BinaryStats.from_scores(scores, labels, bins=1000, exact=True).with_min_cell(10)
    value, bound = auc_with_bound(sent) or (None, None)
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    variance = exact_delong_variance(sent.exact, positives, negatives)
    fit = interval(estimates(sent)["auc"].estimate, 0.95)
    # Assert: exact to rounding, while the merged histograms are not
    reference_auc, reference_variance = _delong_reference(scores, labels)
    assert value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert value == pytest.approx(reference_auc, abs=1e-12) and bound == 0.0
    assert variance == pytest.approx(reference_variance, rel=1e-9)
    hist = auc_from_histograms(sent.pos_hist, sent.neg_hist)
    assert hist is not None and abs(hist - reference_auc) > 1e-4
    assert fit.value == pytest.approx(reference_auc, abs=1e-12)
    assert fit.low is not None and fit.high is not None
    half = 1.96 * np.sqrt(reference_variance) / (reference_auc * (1 - reference_auc))
    logit = np.log(reference_auc / (1 - reference_auc))
    assert fit.low == pytest.approx(1 / (1 + np.exp(-(logit - half))), abs=1e-4)  # no widening
    assert binary_metrics(sent)["auc_tie_bound"] == 0.0
    assert is_exact(estimates(sent)["auc"].estimate)


def test_pooled_auc_counts_within_site_pairs_exactly_and_bounds_only_the_others() -> None:
    # Prepare: three sites on coarse bins (10) that none merges (k = 1), many ties per bin
    sites = [
        _cases(seed, n, shift) for seed, n, shift in ((1, 120, 0.3), (2, 200, 0.1), (3, 80, 0.5))
    ]
    parts = [BinaryStats.from_scores(s, y, bins=10, exact=True).with_min_cell(1) for s, y in sites]
    # Execute
    pooled = pool(parts, BinaryStats.empty(10))
    value, bound = auc_with_bound(pooled) or (0.0, 0.0)
    # Assert: within the smaller bound, and closer than the histograms alone
    exact = roc_auc_score(
        np.concatenate([y for _, y in sites]), np.concatenate([s for s, _ in sites])
    )
    hist_only = auc_from_histograms(pooled.pos_hist, pooled.neg_hist)
    hist_bound = auc_tie_bound(pooled.pos_hist, pooled.neg_hist)
    assert hist_only is not None and hist_bound is not None
    assert abs(value - exact) <= bound + 1e-12
    assert 0 < bound < hist_bound
    assert abs(value - exact) < abs(hist_only - exact)
    assert not is_exact(estimates(pooled)["auc"].estimate)
    assert tie_bound(estimates(pooled)["auc"].estimate) == pytest.approx(bound)
    # a pooled cell that only one site contributes to is exact
    alone = pool([parts[0], BinaryStats.empty(10, suppressed=True)], BinaryStats.empty(10))
    assert is_exact(estimates(alone)["auc"].estimate)


def test_a_cell_merged_into_one_bin_never_reports_half() -> None:
    # Prepare: 17 cases scored below the threshold, 8 positives: one merged bin at k = 10
    rng = np.random.default_rng(4)
    scores = rng.uniform(0.05, 0.45, 17)
    labels = np.array([1] * 8 + [0] * 9)
    stats = BinaryStats.from_scores(scores, labels, bins=1000, exact=True)
    coarse = stats.with_min_cell(10)
    assert sum(1 for v in np.add(coarse.pos_hist, coarse.neg_hist) if v) == 1
    # Execute
    withheld = interval(estimates(coarse)["auc"].estimate, 0.95)
    gap, ratio = compare(estimates(coarse)["auc"].estimate, estimates(stats)["auc"].estimate, 0.95)
    # Assert: no value (the histogram AUC would be 0.5); with k = 5 the exact one
    assert auc_from_histograms(coarse.pos_hist, coarse.neg_hist) == 0.5
    assert withheld.value is None and gap.value is None and ratio.value is None
    exact = interval(estimates(stats.with_min_cell(5))["auc"].estimate, 0.95)
    assert exact.value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert exact.value != 0.5


def test_exact_parts_leave_only_with_k_positives_and_k_negatives() -> None:
    scores, labels = _cases(5, 40)
    stats = BinaryStats.from_scores(scores, labels, bins=100, exact=True)
    fewest = min(int(labels.sum()), int((1 - labels).sum()))
    assert not stats.with_min_cell(fewest + 1).exact
    assert not BinaryStats.from_scores(scores, labels, bins=100).exact  # only when asked
    # without a threshold to keep apart, k of each class can always share one bin
    whole = BinaryStats.from_scores(scores, labels, bins=100, exact=True)
    whole = dataclasses.replace(whole, threshold_bin=None)
    assert whole.with_min_cell(fewest).exact


@pytest.mark.parametrize("seed", range(5))
def test_a_released_exact_count_orders_no_fewer_than_k_cases_inside_a_bin(seed: int) -> None:
    # Prepare: 400 cases with many ties between the classes
    scores, labels = _cases(seed, 400)
    stats = BinaryStats.from_scores(scores, labels, bins=100, exact=True)
    # Execute
    released = stats.with_min_cell(10)
    # Assert: released on these data, and every bin that holds both classes holds k of each
    assert released.exact
    shared = [(p, n) for p, n in zip(released.pos_hist, released.neg_hist, strict=True) if p and n]
    assert shared and all(p >= 10 and n >= 10 for p, n in shared)
    exact = released.exact.mw2 / (2 * released.exact.pairs)
    assert exact == pytest.approx(roc_auc_score(labels, scores))
