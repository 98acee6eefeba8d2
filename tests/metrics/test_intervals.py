"""Confidence intervals, checked against published values, reference libraries and
independent per-case implementations of each method's definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special, stats
from sklearn.metrics import roc_auc_score

from radfed.metrics.binary import auc_from_histograms
from radfed.metrics.intervals import (
    Interval,
    auc_difference,
    auc_ratio,
    delong_auc,
    delong_variance,
    mean_difference,
    mean_from_histogram,
    mean_ratio,
    newcombe_difference,
    proportion_ratio,
    wilson,
)

Z95 = float(stats.norm.ppf(0.975))


# ---------------------------------------------------------------- proportions


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    # Newcombe (1998), Stat Med 17:857-872, Table I, method 3 (Wilson score).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
     (1, 29, 0.0061, 0.1718)],
)  # fmt: skip
def test_wilson_matches_published_values(
    successes: int, trials: int, low: float, high: float
) -> None:
    # Execute
    interval = wilson(successes, trials, confidence=0.95)
    # Assert
    assert interval.value == successes / trials
    assert interval.low == pytest.approx(low, abs=5e-5)
    assert interval.high == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize(("successes", "trials"), [(1, 9), (7, 40), (33, 50), (199, 200)])
@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_wilson_limits_solve_the_score_equation(
    successes: int, trials: int, confidence: float
) -> None:
    # Prepare: the limits are the roots of |p - π| = z sqrt(π (1 - π) / n), found here by
    # bracketing rather than by the closed form.
    p, z = successes / trials, float(stats.norm.ppf(0.5 + confidence / 2))

    def score(pi: float) -> float:
        return abs(p - pi) - z * math.sqrt(pi * (1 - pi) / trials)

    # Execute
    interval = wilson(successes, trials, confidence=confidence)
    # Assert
    assert interval.low == pytest.approx(optimize.brentq(score, 1e-15, p), abs=1e-10)
    assert interval.high == pytest.approx(optimize.brentq(score, p, 1 - 1e-15), abs=1e-10)


def test_wilson_matches_statsmodels() -> None:
    # Prepare
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    cases = [(s, n, c) for n in (1, 5, 37, 400) for s in {0, 1, n // 3, n - 1, n}
             for c in (0.9, 0.95)]  # fmt: skip
    for s, n, c in cases:
        # Execute
        interval = wilson(s, n, confidence=c)
        # Assert
        low, high = proportion.proportion_confint(s, n, alpha=1 - c, method="wilson")
        assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-12)


def test_wilson_edges_and_invalid_input() -> None:
    # Execute
    none, all_hits, no_hits = wilson(0, 0), wilson(12, 12), wilson(0, 12)
    # Assert
    assert none == Interval(None, None, None)
    assert all_hits.value == 1.0 and all_hits.high == 1.0 and all_hits.low is not None
    assert all_hits.low < 1.0
    assert no_hits.low == 0.0 and no_hits.high is not None and no_hits.high > 0.0
    for bad in ((5, 4), (-1, 4)):
        with pytest.raises(ValueError, match="successes"):
            wilson(*bad)
    with pytest.raises(ValueError, match="confidence"):
        wilson(1, 4, confidence=95)


@pytest.mark.parametrize(
    ("counts", "low", "high"),
    # Newcombe (1998), Stat Med 17:873-890, Table II, method 10, examples (a)-(f).
    [((56, 70, 48, 80), 0.0524, 0.3339), ((9, 10, 3, 10), 0.1705, 0.8090),
     ((6, 7, 2, 7), 0.0582, 0.8062), ((5, 56, 0, 29), -0.0381, 0.1926),
     ((0, 10, 0, 20), -0.1611, 0.2775), ((10, 10, 0, 20), 0.6791, 1.0)],
)  # fmt: skip
def test_newcombe_difference_matches_published_table(
    counts: tuple[int, int, int, int], low: float, high: float
) -> None:
    # Execute
    interval = newcombe_difference(*counts, confidence=0.95)
    # Assert
    s1, n1, s2, n2 = counts
    assert interval.value == pytest.approx(s1 / n1 - s2 / n2, abs=1e-15)
    assert interval.low == pytest.approx(low, abs=5e-5)
    assert interval.high == pytest.approx(high, abs=5e-5)


def test_newcombe_and_katz_match_statsmodels() -> None:
    # Prepare
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    cases = [(56, 70, 48, 80), (3, 17, 11, 19), (40, 41, 2, 90), (1, 3, 5, 6)]
    for s1, n1, s2, n2 in cases:
        # Execute
        diff = newcombe_difference(s1, n1, s2, n2, confidence=0.9)
        ratio = proportion_ratio(s1, n1, s2, n2, confidence=0.9)
        # Assert
        expected_diff = proportion.confint_proportions_2indep(
            s1, n1, s2, n2, method="newcomb", compare="diff", alpha=0.1
        )
        expected_ratio = proportion.confint_proportions_2indep(
            s1, n1, s2, n2, method="log", compare="ratio", alpha=0.1
        )
        assert (diff.low, diff.high) == pytest.approx(expected_diff, abs=1e-12)
        assert (ratio.low, ratio.high) == pytest.approx(expected_ratio, rel=1e-12)
        assert ratio.value == pytest.approx((s1 / n1) / (s2 / n2), rel=1e-15)


def test_proportion_ratio_zero_cells() -> None:
    # Execute
    zero_best = proportion_ratio(3, 10, 0, 12)
    zero_worst = proportion_ratio(0, 10, 6, 12)
    all_hits = proportion_ratio(10, 10, 20, 20)
    no_trials = proportion_ratio(0, 0, 6, 12)
    # Assert: a ratio over zero is undefined; zero cells use 0.5 added to every cell
    assert zero_best == Interval(None, None, None)
    assert no_trials == Interval(None, None, None)
    se = math.sqrt(1 / 0.5 - 1 / 11 + 1 / 6.5 - 1 / 13)
    assert zero_worst.value == 0.0 and zero_worst.low == 0.0
    assert zero_worst.high == pytest.approx((0.5 / 11) / (6.5 / 13) * math.exp(Z95 * se))
    assert all_hits.value == 1.0 and all_hits.low is not None and all_hits.high is not None
    assert all_hits.low < 1.0 < all_hits.high


# ---------------------------------------------------------------- AUC


def _per_case_delong(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """AUC and DeLong variance from the definition: ψ = 1, 1/2, 0 for every pair."""
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(psi.mean()), float(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)


def _histograms(pos: np.ndarray, neg: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    def hist(x: np.ndarray) -> np.ndarray:
        return np.bincount(np.minimum((x * bins).astype(np.int64), bins - 1), minlength=bins)

    return hist(pos), hist(neg)


def test_delong_from_histograms_equals_per_case_delong_without_ties() -> None:
    # Prepare: every case in a bin of its own; positives score higher on average
    rng = np.random.default_rng(0)
    bins = 1000
    index = rng.permutation(bins)[:90]
    scores = (index + 0.5) / bins
    labels = np.zeros(90, dtype=bool)
    labels[np.argsort(scores + rng.normal(0, 0.3, 90))[-35:]] = True
    pos_hist, neg_hist = _histograms(scores[labels], scores[~labels], bins)
    # Execute
    interval = delong_auc(pos_hist, neg_hist)
    variance = delong_variance(pos_hist, neg_hist)
    # Assert
    auc, expected = _per_case_delong(scores[labels], scores[~labels])
    assert interval.value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert interval.value == auc_from_histograms(pos_hist, neg_hist)
    assert variance == pytest.approx(expected, abs=1e-12)
    assert 0.6 < auc < 0.95  # a non-trivial case


def test_delong_from_histograms_equals_per_case_delong_of_binned_scores() -> None:
    # Prepare: coarse bins, so positives and negatives share bins (ties count one half)
    rng = np.random.default_rng(1)
    pos, neg = rng.beta(4, 2, 60), rng.beta(2, 3, 80)
    pos_hist, neg_hist = _histograms(pos, neg, 12)
    # Execute
    interval = delong_auc(pos_hist, neg_hist)
    variance = delong_variance(pos_hist, neg_hist)
    # Assert: equal to DeLong on the scores rounded down to their bins
    auc, expected = _per_case_delong(np.floor(pos * 12), np.floor(neg * 12))
    assert interval.value == pytest.approx(auc, abs=1e-12)
    assert variance == pytest.approx(expected, abs=1e-12)


def test_delong_interval_is_on_the_logit_scale() -> None:
    # Prepare: an AUC near 1
    rng = np.random.default_rng(2)
    pos_hist, neg_hist = _histograms(rng.beta(5, 1, 30), rng.beta(1, 4, 30), 1000)
    # Execute
    interval = delong_auc(pos_hist, neg_hist, confidence=0.9)
    # Assert: inside (0, 1), and symmetric around the AUC on the logit scale
    variance = delong_variance(pos_hist, neg_hist)
    assert variance is not None and interval.value is not None
    assert interval.low is not None and interval.high is not None
    auc = interval.value
    assert 0.97 < auc < 1.0 and 0.0 < interval.low < auc < interval.high < 1.0
    se = math.sqrt(variance) / (auc * (1 - auc))
    z = float(stats.norm.ppf(0.95))
    assert special.logit(interval.high) - special.logit(auc) == pytest.approx(z * se)
    assert special.logit(auc) - special.logit(interval.low) == pytest.approx(z * se)


def _simulate(
    rng: np.random.Generator, shift: float, reps: int, m: int, n: int, bins: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """``reps`` binormal data sets (positives N(shift, 1), negatives N(0, 1)) mapped into
    [0, 1] by the normal CDF, as histograms ``(reps, bins)``; true AUC Φ(shift / √2)."""
    pos = special.ndtr(rng.normal(shift, 1.0, (reps, m)))
    neg = special.ndtr(rng.normal(0.0, 1.0, (reps, n)))
    offsets = np.arange(reps)[:, None] * bins

    def hist(x: np.ndarray) -> np.ndarray:
        index = np.minimum((x * bins).astype(np.int64), bins - 1) + offsets
        return np.bincount(index.ravel(), minlength=reps * bins).reshape(reps, bins)

    return hist(pos), hist(neg)


def test_delong_intervals_cover_the_true_auc() -> None:
    # Prepare: 300 data sets per group, two groups with known AUCs
    rng = np.random.default_rng(3)
    reps = 300
    true_a, true_b = special.ndtr(1.2 / math.sqrt(2)), special.ndtr(0.6 / math.sqrt(2))
    pos_a, neg_a = _simulate(rng, 1.2, reps, 30, 45)
    pos_b, neg_b = _simulate(rng, 0.6, reps, 40, 40)
    # Execute
    single = [delong_auc(pos_a[i], neg_a[i]) for i in range(reps)]
    diffs = [auc_difference((pos_a[i], neg_a[i]), (pos_b[i], neg_b[i])) for i in range(reps)]
    ratios = [auc_ratio((pos_a[i], neg_a[i]), (pos_b[i], neg_b[i])) for i in range(reps)]

    # Assert
    def coverage(intervals: list[Interval], truth: float) -> float:
        return float(np.mean([i.low is not None and i.high is not None
                              and i.low <= truth <= i.high for i in intervals]))  # fmt: skip

    assert 0.92 <= coverage(single, true_a) <= 0.98
    assert 0.92 <= coverage(diffs, true_a - true_b) <= 0.98
    assert 0.92 <= coverage(ratios, true_a / true_b) <= 0.98


def test_auc_difference_and_ratio_combine_the_groups_variances() -> None:
    # Prepare
    rng = np.random.default_rng(4)
    a = _histograms(rng.beta(3, 2, 50), rng.beta(2, 3, 70), 500)
    b = _histograms(rng.beta(5, 2, 25), rng.beta(2, 4, 90), 500)
    # Execute
    diff = auc_difference(a, b, confidence=0.95)
    ratio = auc_ratio(a, b, confidence=0.95)
    # Assert
    auc_a, auc_b = auc_from_histograms(*a), auc_from_histograms(*b)
    var_a, var_b = delong_variance(*a), delong_variance(*b)
    assert auc_a is not None and auc_b is not None and var_a is not None and var_b is not None
    half = Z95 * math.sqrt(var_a + var_b)
    assert diff.value == pytest.approx(auc_a - auc_b, abs=1e-15)
    assert (diff.low, diff.high) == pytest.approx((auc_a - auc_b - half, auc_a - auc_b + half))
    log_half = Z95 * math.sqrt(var_a / auc_a**2 + var_b / auc_b**2)
    r = auc_a / auc_b
    assert ratio.value == pytest.approx(r)
    assert (ratio.low, ratio.high) == pytest.approx(
        (r / math.exp(log_half), r * math.exp(log_half))
    )


def test_auc_edge_cases() -> None:
    # Prepare
    one_class = ([3, 0, 2], [0, 0, 0])
    one_positive = ([0, 0, 1], [2, 1, 0])
    perfect = ([0, 0, 4], [3, 1, 0])
    worst = ([4, 0, 0], [0, 1, 3])
    fine = ([1, 2, 3], [3, 2, 1])
    # Execute / Assert: no AUC without both classes
    assert delong_auc(*one_class) == Interval(None, None, None)
    assert delong_variance(*one_class) is None
    assert auc_difference(one_class, fine) == Interval(None, None, None)
    assert auc_ratio(fine, one_class) == Interval(None, None, None)
    # a value but no variance with one case of a class
    assert delong_auc(*one_positive) == Interval(1.0, None, None)
    assert auc_difference(one_positive, fine).low is None
    # AUC 1: zero DeLong variance, no interval on the logit scale
    assert delong_auc(*perfect) == Interval(1.0, None, None)
    assert auc_difference(perfect, fine).low is not None
    # ratio over a zero AUC is undefined; a zero numerator has no log-scale interval
    assert auc_ratio(fine, worst) == Interval(None, None, None)
    assert auc_ratio(worst, fine) == Interval(0.0, None, None)
    with pytest.raises(ValueError, match="bins"):
        delong_auc([1, 2], [1, 2, 3])


# ---------------------------------------------------------------- means


def _summary(values: np.ndarray, bins: int, low: float, high: float) -> tuple[np.ndarray, float]:
    index = np.clip(np.floor((values - low) / (high - low) * bins), 0, bins - 1)
    return np.bincount(index.astype(np.int64), minlength=bins), math.fsum(values.tolist())


def test_mean_is_exact_and_deviation_within_half_a_bin() -> None:
    # Prepare: Dice-like values on [0, 1] and HD95-like values on [0, 90]
    rng = np.random.default_rng(5)
    for values, bins, low, high in (
        (rng.beta(6, 3, 200), 10, 0.0, 1.0),
        (rng.beta(6, 3, 200), 100, 0.0, 1.0),
        (rng.gamma(3.0, 4.0, 150), 50, 0.0, 90.0),
    ):
        hist, total = _summary(values, bins, low, high)
        # Execute
        interval = mean_from_histogram(hist, total, low=low, high=high, confidence=0.95)
        # Assert: exact mean; the deviation behind the half-width within the bound
        n = values.size
        assert interval.value is not None and interval.low is not None
        assert interval.value == pytest.approx(np.mean(values), abs=1e-12 * high)
        half = interval.value - interval.low
        sd = half * math.sqrt(n) / float(stats.t.ppf(0.975, n - 1))
        bound = (high - low) / bins / 2 * math.sqrt(n / (n - 1))
        assert abs(sd - np.std(values, ddof=1)) <= bound
        assert abs(sd**2 - np.var(values, ddof=1)) <= bound * (2 * np.std(values, ddof=1) + bound)


def test_mean_intervals_equal_scipy_t_intervals_on_bin_midpoints() -> None:
    # Prepare: values at bin midpoints, where the histogram variance is exact
    rng = np.random.default_rng(6)
    bins, low, high = 20, 0.0, 1.0
    a = (rng.integers(6, 19, 40) + 0.5) / bins
    b = (rng.integers(3, 17, 25) + 0.5) / bins
    sa, sb = _summary(a, bins, low, high), _summary(b, bins, low, high)
    # Execute
    single = mean_from_histogram(*sa, low=low, high=high, confidence=0.9)
    diff = mean_difference(sa, sb, low=low, high=high, confidence=0.9)
    # Assert
    one = stats.ttest_1samp(a, 0.0).confidence_interval(confidence_level=0.9)
    welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence_level=0.9)
    assert (single.value, single.low, single.high) == pytest.approx(
        (a.mean(), one.low, one.high), abs=1e-12
    )
    assert (diff.value, diff.low, diff.high) == pytest.approx(
        (a.mean() - b.mean(), welch.low, welch.high), abs=1e-12
    )


def test_mean_ratio_is_the_log_scale_delta_method() -> None:
    # Prepare: values at bin midpoints
    rng = np.random.default_rng(7)
    bins, low, high = 40, 0.0, 80.0
    a = (rng.integers(2, 30, 30) + 0.5) * 2.0
    b = (rng.integers(4, 38, 50) + 0.5) * 2.0
    # Execute
    ratio = mean_ratio(
        _summary(a, bins, low, high), _summary(b, bins, low, high), low=low, high=high
    )
    # Assert
    va = a.var(ddof=1) / (a.size * a.mean() ** 2)
    vb = b.var(ddof=1) / (b.size * b.mean() ** 2)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = float(stats.t.ppf(0.975, df)) * math.sqrt(va + vb)
    r = a.mean() / b.mean()
    assert (ratio.value, ratio.low, ratio.high) == pytest.approx(
        (r, r * math.exp(-half), r * math.exp(half)), rel=1e-12
    )


def test_mean_edge_cases() -> None:
    # Prepare
    empty = ([0, 0, 0, 0], 0.0)
    single = ([0, 1, 0, 0], 0.3)
    zeros = ([5, 0, 0, 0], 0.0)
    some = ([1, 2, 3, 1], 3.9)
    # Execute / Assert
    assert mean_from_histogram(*empty, low=0, high=1) == Interval(None, None, None)
    assert mean_from_histogram(*single, low=0, high=1) == Interval(0.3, None, None)
    assert mean_difference(empty, some, low=0, high=1) == Interval(None, None, None)
    assert mean_difference(single, some, low=0, high=1).low is None
    assert mean_ratio(some, zeros, low=0, high=1) == Interval(None, None, None)
    assert mean_ratio(zeros, some, low=0, high=1) == Interval(0.0, None, None)
    narrow = mean_from_histogram([0, 0, 0, 30], 29.9, low=0, high=1)
    assert narrow.high == 1.0  # clipped to the range of the values
    with pytest.raises(ValueError, match="outside"):
        mean_from_histogram([1, 2, 0, 0], 3.5, low=0, high=1)
    with pytest.raises(ValueError, match=">= 0"):
        mean_ratio(some, some, low=-1, high=1)


def test_interval_to_dict() -> None:
    # Execute
    out = Interval(0.8123456, 0.7, None).to_dict(3)
    # Assert
    assert out == {"value": 0.812, "low": 0.7, "high": None}
    assert Interval(None).to_dict() == {"value": None, "low": None, "high": None}
