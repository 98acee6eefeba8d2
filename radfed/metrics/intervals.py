"""Confidence intervals of metrics and of gaps between groups, from mergeable statistics.

Every function is pure and takes only what the server holds (counts, score histograms,
exact sums), never per-case values. An ``Interval`` has ``value`` None where the metric is
undefined (no cases, one class missing, a ratio over zero) and ``low``/``high`` None where
the value has no interval (too few cases for a variance, or an estimate on the boundary
of a scale that cannot hold it). Intervals are two-sided: ``confidence=0.95`` leaves 2.5%
on each side. Differences and ratios compare two disjoint groups, so their estimates are
independent and their variances add. ``METHODS`` names each function's method in words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

import numpy as np
from scipy import special, stats

from radfed.metrics.binary import auc_from_histograms

__all__ = [
    "METHODS",
    "Counts",
    "Interval",
    "add_noise",
    "auc_difference",
    "auc_noise_se",
    "auc_ratio",
    "delong_auc",
    "delong_variance",
    "logit_auc_interval",
    "mean_difference",
    "mean_from_histogram",
    "mean_ratio",
    "newcombe_difference",
    "proportion_noise_se",
    "proportion_ratio",
    "ratio_with_noise",
    "wilson",
    "z_value",
]

#: Histogram counts per bin, shape ``(B,)``.
Counts: TypeAlias = Sequence[int] | np.ndarray

#: Each function's method in words (for the ``methods`` section of reports).
METHODS: dict[str, str] = {
    "wilson": "Wilson score interval (Wilson 1927); with a design effect, on the effective "
    "sample size n / max(1, deff) (Korn and Graubard 1998)",
    "newcombe_difference": "Newcombe hybrid score interval, method 10 (Newcombe 1998)",
    "proportion_ratio": "Katz log interval, 0.5 added to each cell when one is zero "
    "(Katz et al. 1978)",
    "delong_auc": "DeLong variance from the score histograms (DeLong et al. 1988), "
    "normal interval on the logit scale",
    "auc_difference": "sum of the groups' DeLong variances, normal interval",
    "auc_ratio": "sum of the groups' DeLong variances, delta method on the log scale",
    "mean_from_histogram": "exact mean; t interval, variance from bin midpoints",
    "mean_difference": "Welch t interval, variances from bin midpoints (Welch 1947)",
    "mean_ratio": "delta method on the log scale, Welch degrees of freedom",
}


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval.

    Attributes:
        value: the estimate; None where it is undefined.
        low, high: the interval's limits; None where the estimate has no interval.
    """

    value: float | None
    low: float | None = None
    high: float | None = None

    def to_dict(self, digits: int | None = None) -> dict[str, float | None]:
        """``{"value", "low", "high"}``, each rounded to ``digits`` places when given."""
        out = {"value": self.value, "low": self.low, "high": self.high}
        if digits is None:
            return out
        return {k: None if v is None else round(v, digits) for k, v in out.items()}


_UNDEFINED = Interval(None)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        msg = f"confidence must be strictly between 0 and 1, got {confidence!r}"
        raise ValueError(msg)


def z_value(confidence: float) -> float:
    """The standard normal quantile leaving ``(1 - confidence) / 2`` above it."""
    _check_confidence(confidence)
    return float(special.ndtri(0.5 + confidence / 2))  # scipy's norm.ppf, without its checks


_z = z_value


def _t(confidence: float, df: float) -> float:
    """Student's t quantile with ``df`` degrees of freedom, two-sided."""
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def _check_proportion(successes: int, trials: int) -> None:
    if not 0 <= successes <= trials:
        msg = f"need 0 <= successes <= trials, got {successes!r} of {trials!r}"
        raise ValueError(msg)


def _counts(hist: Counts, name: str) -> np.ndarray:
    counts = np.asarray(hist, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
        msg = f"{name} must be a non-empty 1-D array of counts >= 0, got shape {counts.shape}"
        raise ValueError(msg)
    return counts


# ---------------------------------------------------------------- proportions


def _wilson_limits(successes: float, trials: float, z: float) -> tuple[float, float]:
    p = successes / trials
    shrink = z * z / trials
    centre = (p + shrink / 2) / (1 + shrink)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + shrink)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def _inflation(design_effect: float) -> float:
    """The variance inflation of a design effect: ``max(1, deff)`` (Korn and Graubard)."""
    if not (math.isfinite(design_effect) and design_effect > 0):
        msg = f"a design effect must be a finite number above 0, got {design_effect!r}"
        raise ValueError(msg)
    return max(1.0, design_effect)


def _effective(successes: int, trials: int, design_effect: float) -> tuple[float, float]:
    """The effective counts ``(p n_eff, n_eff)`` with ``n_eff = n / max(1, deff)``."""
    scale = _inflation(design_effect)
    return successes / scale, trials / scale


def wilson(
    successes: int, trials: int, *, confidence: float = 0.95, design_effect: float = 1.0
) -> Interval:
    """Wilson score interval of a proportion.

    The limits are the proportions ``π`` with ``|p - π| = z sqrt(π (1 - π) / n)``; the
    interval stays in [0, 1], reaches 0 when ``successes == 0`` and 1 when
    ``successes == trials``. With a ``design_effect`` (clustered cases) ``n`` is the
    effective sample size ``n / max(1, deff)`` (E. L. Korn, B. I. Graubard (1998),
    Confidence intervals for proportions with small expected number of positive counts
    estimated from survey data, Survey Methodology 24:193-201). Reference: E. B. Wilson
    (1927), Probable inference, the law of succession, and statistical inference, JASA
    22:209-212; Newcombe (1998), Stat Med 17:857-872, method 3.

    Returns:
        The proportion and its interval; all None when ``trials == 0``.
    """
    _check_proportion(successes, trials)
    z = _z(confidence)
    if trials == 0:
        return _UNDEFINED
    limits = _wilson_limits(*_effective(successes, trials, design_effect), z)
    return Interval(successes / trials, *limits)


def newcombe_difference(
    s1: int,
    n1: int,
    s2: int,
    n2: int,
    *,
    confidence: float = 0.95,
    design_effects: tuple[float, float] = (1.0, 1.0),
) -> Interval:
    """Difference ``p1 - p2`` of two independent proportions, Newcombe's hybrid score interval.

    With Wilson limits ``(l1, u1)`` and ``(l2, u2)`` of the two proportions, the limits are
    ``d - sqrt((p1 - l1)^2 + (u2 - p2)^2)`` and ``d + sqrt((u1 - p1)^2 + (p2 - l2)^2)``;
    each Wilson interval on its effective sample size under its ``design_effects`` entry
    (as ``wilson``). Reference: R. G. Newcombe (1998), Interval estimation for the
    difference between independent proportions: comparison of eleven methods, Stat Med
    17:873-890, method 10.

    Returns:
        All None when either group has no trials.
    """
    _check_proportion(s1, n1)
    _check_proportion(s2, n2)
    z = _z(confidence)
    if n1 == 0 or n2 == 0:
        return _UNDEFINED
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = _wilson_limits(*_effective(s1, n1, design_effects[0]), z)
    l2, u2 = _wilson_limits(*_effective(s2, n2, design_effects[1]), z)
    return mover_difference(Interval(p1, l1, u1), Interval(p2, l2, u2))


def mover_difference(first: Interval, second: Interval) -> Interval:
    """The difference of two independent estimates from their own intervals, by the method
    of variance estimates recovery (MOVER; Zou and Donner 2008): ``d - sqrt((a - la)^2 +
    (ub - b)^2)`` to ``d + sqrt((ua - a)^2 + (b - lb)^2)``, within [-1, 1] (estimates on
    [0, 1]). Newcombe's interval is this over Wilson limits. Without both intervals, the
    difference alone."""
    a, b = first.value, second.value
    if a is None or b is None:
        return _UNDEFINED
    if None in (first.low, first.high, second.low, second.high):
        return Interval(a - b)
    assert first.low is not None and first.high is not None
    assert second.low is not None and second.high is not None
    d = a - b
    low = d - math.hypot(a - first.low, second.high - b)
    high = d + math.hypot(first.high - a, b - second.low)
    return Interval(d, max(-1.0, low), min(1.0, high))


def proportion_ratio(
    s1: int,
    n1: int,
    s2: int,
    n2: int,
    *,
    confidence: float = 0.95,
    design_effects: tuple[float, float] = (1.0, 1.0),
) -> Interval:
    """Ratio ``p1 / p2`` of two independent proportions, Katz log interval.

    ``exp(log r ± z sqrt(1/s1 - 1/n1 + 1/s2 - 1/n2))``; each group's two terms multiplied
    by ``max(1, deff)`` of its ``design_effects`` entry (its effective counts). Where any
    of the four cells (``s1``, ``n1 - s1``, ``s2``, ``n2 - s2``) is zero, the interval is
    computed with 0.5 added to every cell (Haldane-Anscombe); the value stays the observed
    ratio and the interval is widened to contain it (so ``s1 == 0`` gives ``low = 0``). Reference:
    D. Katz, J. Baptista, S. P. Azen, M. C. Pike (1978), Obtaining confidence intervals for
    the risk ratio in cohort studies, Biometrics 34:469-474.

    Returns:
        All None when either group has no trials or ``s2 == 0`` (no ratio over zero).
    """
    _check_proportion(s1, n1)
    _check_proportion(s2, n2)
    z = _z(confidence)
    if n1 == 0 or n2 == 0 or s2 == 0:
        return _UNDEFINED
    ratio = (s1 / n1) / (s2 / n2)
    a, m1, b, m2 = float(s1), float(n1), float(s2), float(n2)
    if 0 in (s1, n1 - s1, s2, n2 - s2):
        a, m1, b, m2 = a + 0.5, m1 + 1.0, b + 0.5, m2 + 1.0
    centre = math.log((a / m1) / (b / m2))
    d1, d2 = (_inflation(d) for d in design_effects)
    se = math.sqrt(d1 * (1 / a - 1 / m1) + d2 * (1 / b - 1 / m2))
    low, high = math.exp(centre - z * se), math.exp(centre + z * se)
    return Interval(ratio, min(low, ratio), max(high, ratio))


# ---------------------------------------------------------------- AUC


class _AucFit(NamedTuple):
    auc: float
    variance: float | None


def _delong(pos_hist: Counts, neg_hist: Counts) -> _AucFit | None:
    """AUC and DeLong variance from histograms; None unless both classes are present."""
    pos, neg = _counts(pos_hist, "pos_hist"), _counts(neg_hist, "neg_hist")
    if pos.shape != neg.shape:
        msg = f"pos_hist and neg_hist differ in bins: {pos.size} vs {neg.size}"
        raise ValueError(msg)
    auc = auc_from_histograms(pos, neg)
    if auc is None:
        return None
    m, n = float(pos.sum()), float(neg.sum())
    if m < 2 or n < 2:
        return _AucFit(auc, None)
    # Structural components of a case in bin b: the share of the other class it beats,
    # counting the other class's cases in its own bin one half.
    v10 = (np.cumsum(neg) - 0.5 * neg) / n
    v01 = (m - np.cumsum(pos) + 0.5 * pos) / m
    s10 = float(np.dot(pos, (v10 - auc) ** 2)) / (m - 1)
    s01 = float(np.dot(neg, (v01 - auc) ** 2)) / (n - 1)
    return _AucFit(auc, s10 / m + s01 / n)


def delong_variance(pos_hist: Counts, neg_hist: Counts) -> float | None:
    """DeLong's variance of the histogram AUC.

    Each positive in bin ``b`` has the structural component ``V10`` = (negatives in lower
    bins + half the negatives in bin ``b``) / ``n``, each negative ``V01`` = (positives in
    higher bins + half the positives in bin ``b``) / ``m``; the variance is
    ``var(V10) / m + var(V01) / n`` with sample variances (divisor ``m - 1``, ``n - 1``).
    Cases of one bin are tied, so this equals DeLong's variance of the cases whenever no
    positive shares a bin with a negative. Reference: E. R. DeLong, D. M. DeLong,
    D. L. Clarke-Pearson (1988), Comparing the areas under two or more correlated receiver
    operating characteristic curves: a nonparametric approach, Biometrics 44:837-845.

    Args:
        pos_hist, neg_hist: positive and negative cases per score bin, shape ``(B,)``.

    Returns:
        None unless there are at least two cases of each class.
    """
    fit = _delong(pos_hist, neg_hist)
    return None if fit is None else fit.variance


def delong_auc(pos_hist: Counts, neg_hist: Counts, *, confidence: float = 0.95) -> Interval:
    """ROC AUC from score histograms with a DeLong interval on the logit scale.

    The value equals ``auc_from_histograms`` (Mann-Whitney, ties within a bin count one
    half). The interval is ``expit(logit(A) ± z se / (A (1 - A)))`` with ``se`` from
    ``delong_variance`` (delta method): it stays inside (0, 1) and is asymmetric near 1,
    where a clipped normal interval undercovers. Reference: DeLong et al. (1988); M. S. Pepe
    (2003), The Statistical Evaluation of Medical Tests for Classification and Prediction,
    section 5.2.

    Returns:
        All None unless both classes are present; ``low``/``high`` None with fewer than two
        cases of a class, or when the AUC is 0 or 1 (the DeLong variance is then zero and
        the logit infinite: no interval rather than a false ``[1, 1]``).
    """
    _check_confidence(confidence)
    fit = _delong(pos_hist, neg_hist)
    if fit is None:
        return _UNDEFINED
    return logit_auc_interval(fit.auc, fit.variance, confidence=confidence)


def logit_auc_interval(auc: float, variance: float | None, *, confidence: float = 0.95) -> Interval:
    """An AUC with the normal interval of its logit, ``expit(logit(A) ± z se / (A (1 - A)))``
    for a variance ``se^2`` of ``A`` (DeLong's, Obuchowski's): the method of ``delong_auc``.

    Returns:
        No limits without a variance, or when the AUC is 0 or 1.
    """
    z = _z(confidence)
    if variance is None or auc in (0.0, 1.0):
        return Interval(auc)
    se = math.sqrt(variance) / (auc * (1 - auc))
    centre = math.log(auc / (1 - auc))
    return Interval(
        auc, float(special.expit(centre - z * se)), float(special.expit(centre + z * se))
    )


def auc_difference(
    a: tuple[Counts, Counts], b: tuple[Counts, Counts], *, confidence: float = 0.95
) -> Interval:
    """Difference ``AUC_a - AUC_b`` of two disjoint groups, each given as ``(pos, neg)``.

    The groups' estimates are independent, so the variance is the sum of their DeLong
    variances; the interval is normal, clipped to [-1, 1]. Reference: DeLong et al. (1988)
    (without the covariance term, which is zero for disjoint cases).

    Returns:
        All None unless both groups have an AUC; ``low``/``high`` None unless both have a
        variance.
    """
    z = _z(confidence)
    fa, fb = _delong(*a), _delong(*b)
    if fa is None or fb is None:
        return _UNDEFINED
    d = fa.auc - fb.auc
    if fa.variance is None or fb.variance is None:
        return Interval(d)
    se = math.sqrt(fa.variance + fb.variance)
    return Interval(d, max(-1.0, d - z * se), min(1.0, d + z * se))


def auc_ratio(
    a: tuple[Counts, Counts], b: tuple[Counts, Counts], *, confidence: float = 0.95
) -> Interval:
    """Ratio ``AUC_a / AUC_b`` of two disjoint groups, each given as ``(pos, neg)``.

    Delta method on the log scale: ``exp(log r ± z sqrt(V_a / A_a^2 + V_b / A_b^2))`` with
    the DeLong variances ``V``.

    Returns:
        All None unless both groups have an AUC and ``AUC_b > 0``; ``low``/``high`` None
        unless both have a variance, or when ``AUC_a == 0`` (log of zero).
    """
    z = _z(confidence)
    fa, fb = _delong(*a), _delong(*b)
    if fa is None or fb is None or fb.auc == 0:
        return _UNDEFINED
    r = fa.auc / fb.auc
    if fa.variance is None or fb.variance is None or fa.auc == 0:
        return Interval(r)
    se = math.sqrt(fa.variance / fa.auc**2 + fb.variance / fb.auc**2)
    return Interval(r, r * math.exp(-z * se), r * math.exp(z * se))


# ---------------------------------------------------------------- means of bounded values


class _MeanFit(NamedTuple):
    n: int
    mean: float
    variance: float | None  # sample variance of the values (divisor n - 1)


def _mean_fit(hist: Counts, total: float, low: float, high: float) -> _MeanFit | None:
    counts = _counts(hist, "hist")
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        msg = f"need finite low < high for the histogram range, got [{low!r}, {high!r}]"
        raise ValueError(msg)
    n = round(float(counts.sum()))
    if n == 0:
        return None
    slack = 1e-9 * n * max(abs(low), abs(high), 1.0)
    if not (n * low - slack <= total <= n * high + slack):
        msg = f"the sum {total!r} of {n} values is outside [{n * low}, {n * high}]"
        raise ValueError(msg)
    mean = min(max(total / n, low), high)
    if n < 2:
        return _MeanFit(n, mean, None)
    width = (high - low) / counts.size
    midpoints = low + (np.arange(counts.size) + 0.5) * width
    return _MeanFit(n, mean, float(np.dot(counts, (midpoints - mean) ** 2)) / (n - 1))


def mean_from_histogram(
    hist: Counts, total: float, *, low: float, high: float, confidence: float = 0.95
) -> Interval:
    """Mean of bounded per-case values with a t interval, from a histogram and exact sum.

    The value is the exact mean ``total / n``. The sample variance is estimated from the
    histogram: each value is placed at its bin's midpoint and its squared distance from the
    exact mean is summed (divisor ``n - 1``); no Sheppard correction. The estimated standard
    deviation is within ``sqrt(n / (n - 1))`` half bin widths of the values' own, more where
    bins were merged for privacy (a run's cases stored in its first bin). The interval is
    ``mean ± t(n - 1) s / sqrt(n)`` (Student 1908), clipped to ``[low, high]``.

    Args:
        hist: cases per equal-width bin on ``[low, high]``, shape ``(B,)``.
        total: exact sum of the cases' values.
        low, high: the range the bins cover.

    Returns:
        All None without cases; ``low``/``high`` None with a single case.
    """
    _check_confidence(confidence)
    fit = _mean_fit(hist, total, low, high)
    if fit is None:
        return _UNDEFINED
    if fit.variance is None:
        return Interval(fit.mean)
    half = _t(confidence, fit.n - 1) * math.sqrt(fit.variance / fit.n)
    return Interval(fit.mean, max(low, fit.mean - half), min(high, fit.mean + half))


def _welch(va: float, vb: float, fa: _MeanFit, fb: _MeanFit) -> tuple[float, float]:
    """Standard error and Welch-Satterthwaite degrees of freedom of two variance terms."""
    se2 = va + vb
    if se2 == 0:
        return 0.0, math.inf
    df = se2**2 / (va**2 / (fa.n - 1) + vb**2 / (fb.n - 1))
    return math.sqrt(se2), df


def mean_difference(
    a: tuple[Counts, float],
    b: tuple[Counts, float],
    *,
    low: float,
    high: float,
    confidence: float = 0.95,
) -> Interval:
    """Difference of the means of two disjoint groups, Welch's t interval.

    Each group is ``(hist, total)`` as for ``mean_from_histogram``, both on ``[low, high]``.
    The value is the difference of the exact means; the interval is
    ``d ± t(df) sqrt(s_a^2 / n_a + s_b^2 / n_b)`` with the histogram variances and the
    Welch-Satterthwaite ``df``, clipped to ``±(high - low)``. Reference: B. L. Welch (1947),
    The generalization of "Student's" problem when several different population variances
    are involved, Biometrika 34:28-35.

    Returns:
        All None unless both groups have cases; ``low``/``high`` None unless both have at
        least two.
    """
    _check_confidence(confidence)
    fa, fb = _mean_fit(a[0], a[1], low, high), _mean_fit(b[0], b[1], low, high)
    if fa is None or fb is None:
        return _UNDEFINED
    d = fa.mean - fb.mean
    if fa.variance is None or fb.variance is None:
        return Interval(d)
    se, df = _welch(fa.variance / fa.n, fb.variance / fb.n, fa, fb)
    half = _t(confidence, df) * se
    span = high - low
    return Interval(d, max(-span, d - half), min(span, d + half))


def mean_ratio(
    a: tuple[Counts, float],
    b: tuple[Counts, float],
    *,
    low: float,
    high: float,
    confidence: float = 0.95,
) -> Interval:
    """Ratio of the means of two disjoint groups of values >= 0, delta method on the log scale.

    ``exp(log r ± t(df) sqrt(s_a^2 / (n_a m_a^2) + s_b^2 / (n_b m_b^2)))`` with the
    histogram variances ``s^2``, exact means ``m`` and Welch-Satterthwaite ``df`` of the two
    terms.

    Raises:
        ValueError: ``low < 0`` (a ratio of means needs values >= 0).

    Returns:
        All None unless both groups have cases and the mean of ``b`` is above 0;
        ``low``/``high`` None unless both have at least two cases, or when the mean of
        ``a`` is 0.
    """
    _check_confidence(confidence)
    if low < 0:
        msg = f"a ratio of means needs values >= 0, got the range [{low!r}, {high!r}]"
        raise ValueError(msg)
    fa, fb = _mean_fit(a[0], a[1], low, high), _mean_fit(b[0], b[1], low, high)
    if fa is None or fb is None or fb.mean == 0:
        return _UNDEFINED
    r = fa.mean / fb.mean
    if fa.variance is None or fb.variance is None or fa.mean == 0:
        return Interval(r)
    va = fa.variance / (fa.n * fa.mean**2)
    vb = fb.variance / (fb.n * fb.mean**2)
    se, df = _welch(va, vb, fa, fb)
    half = _t(confidence, df) * se
    return Interval(r, r * math.exp(-half), r * math.exp(half))


# ---------------------------------------------------------------- noisy counts (DP statistics)


def proportion_noise_se(
    successes: float, failures: float, var_successes: float, var_failures: float
) -> float | None:
    """Standard error of ``s / (s + f)`` that independent noise on the two counts adds,
    delta method: ``sqrt(f^2 V_s + s^2 V_f) / (s + f)^2`` (counts taken as at least 0);
    None unless ``s + f > 0``."""
    s, f = max(successes, 0.0), max(failures, 0.0)
    n = s + f
    if n <= 0:
        return None
    return math.sqrt(f * f * var_successes + s * s * var_failures) / (n * n)


def auc_noise_se(pos_hist: Sequence[int], neg_hist: Sequence[int], variance: float) -> float | None:
    """Standard error of the Mann-Whitney AUC of histograms that independent noise of
    ``variance`` on every bin adds, delta method (the AUC is ``W / (P N)`` with ``W`` the
    pairs won); None unless both noisy totals are above 0."""
    pos = np.asarray(pos_hist, dtype=np.float64)
    neg = np.asarray(neg_hist, dtype=np.float64)
    m, n = float(pos.sum()), float(neg.sum())
    if m <= 0 or n <= 0:
        return None
    auc = auc_from_histograms(pos, neg)
    assert auc is not None
    below = np.cumsum(neg) - neg  # negatives in lower bins
    above = pos.sum() - np.cumsum(pos)  # positives in higher bins
    d_pos = (below + 0.5 * neg) / (m * n) - auc / m
    d_neg = (above + 0.5 * pos) / (m * n) - auc / n
    return math.sqrt(variance * float(np.sum(d_pos**2) + np.sum(d_neg**2)))


def add_noise(
    fit: Interval,
    value: float | None,
    half_width: float,
    *,
    lowest: float,
    highest: float,
) -> Interval:
    """A sampling interval ``fit`` (of the counts taken as exact) around ``value`` (the
    noisy estimate), each side widened in quadrature by ``half_width`` (``z`` times the
    noise's standard error): the noise and the sampling error are independent, so their
    half-widths add as squares (the MOVER principle: G. Y. Zou and A. Donner (2008),
    Construction of confidence limits about effect measures, Stat Med 27:1693-1702).
    No interval when ``fit`` has none."""
    if value is None or fit.value is None or fit.low is None or fit.high is None:
        return Interval(value)
    low = value - math.hypot(fit.value - fit.low, half_width)
    high = value + math.hypot(fit.high - fit.value, half_width)
    return Interval(value, max(lowest, low), min(highest, high))


def ratio_with_noise(fit: Interval, value: float | None, log_half_width: float) -> Interval:
    """A ratio's interval ``fit`` around the noisy ratio ``value``, widened in quadrature on
    the log scale by ``log_half_width`` (``z`` times the log ratio's noise standard error)."""
    limits = (value, fit.value, fit.low, fit.high)
    if any(v is None or v <= 0 for v in limits):
        return Interval(value)
    assert value is not None and fit.value is not None and fit.low is not None
    assert fit.high is not None
    down = math.hypot(math.log(fit.value / fit.low), log_half_width)
    up = math.hypot(math.log(fit.high / fit.value), log_half_width)
    if not up < _LARGEST_LOG:  # noise far larger than the value: no upper limit
        return Interval(value, value * math.exp(-min(down, _LARGEST_LOG)), None)
    return Interval(value, value * math.exp(-down), value * math.exp(up))


#: The largest log-scale half-width turned into a limit (``exp`` overflows beyond ~709).
_LARGEST_LOG = 700.0
