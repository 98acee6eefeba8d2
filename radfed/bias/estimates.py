"""What each metric is estimated from, so that intervals and group differences can be computed.

A metric of merged statistics is a proportion of counts, an AUC of score histograms (exact
within the sites that sent their Mann-Whitney count), a mean of a histogrammed per-case
value with its exact sum, or a plain value without an interval (AP, FROC). ``estimates``
maps a task's statistics to these; ``interval`` and ``compare`` turn them into intervals
(methods named in ``METHODS``); ``design_effect``, ``is_exact`` and ``tie_bound`` say more
about an estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeVar

from radfed.bias.auc_fit import MAX_TIE_BOUND, AucFit, fit_auc, withheld
from radfed.metrics import intervals as iv
from radfed.metrics.binary import (
    BinaryStats,
    binary_metrics,
    noisy_auc,
    noisy_ratio,
)
from radfed.metrics.clusters import AucClusters, ProportionClusters, proportion_design_effect
from radfed.metrics.detection import DetectionStats, detection_metrics
from radfed.metrics.exact_auc import ExactAuc
from radfed.metrics.intervals import Interval
from radfed.metrics.multiclass import MulticlassStats, multiclass_metrics
from radfed.metrics.segmentation import SegmentationStats

__all__ = [
    "MAX_TIE_BOUND",
    "METHODS",
    "Auc",
    "Estimate",
    "Mean",
    "Metric",
    "Plain",
    "Proportion",
    "compare",
    "design_effect",
    "estimates",
    "interval",
    "is_exact",
    "tie_bound",
]


@dataclass(frozen=True)
class Proportion:
    """``successes`` of ``trials``; with DP statistics, noisy counts whose successes and
    failures carry independent noise of the variances ``noise``; ``clusters``: the sites'
    per-patient sums (``radfed.metrics.clusters``), used where they cover every trial."""

    successes: int
    trials: int
    noise: tuple[float, float] = (0.0, 0.0)
    clusters: ProportionClusters | None = None


@dataclass(frozen=True)
class Auc:
    """ROC AUC of positive and negative score histograms; ``noise`` is each bin's noise
    variance (DP statistics); ``exact`` the sites' exact Mann-Whitney parts and
    ``clusters`` their per-patient sums for Obuchowski's variance."""

    pos: tuple[int, ...]
    neg: tuple[int, ...]
    noise: float = 0.0
    exact: ExactAuc = field(default_factory=ExactAuc)
    clusters: AucClusters | None = None


@dataclass(frozen=True)
class Mean:
    """Mean of a per-case value from its exact sum and its histogram on [low, high]."""

    hist: tuple[int, ...]
    total: float
    low: float
    high: float


@dataclass(frozen=True)
class Plain:
    """A value without an interval."""

    value: float | None


Estimate = Proportion | Auc | Mean | Plain
_Clusters = TypeVar("_Clusters", ProportionClusters, AucClusters)

#: The interval method of each kind of estimate, as the report names it.
METHODS = {
    "proportion": (
        "Wilson score interval; where the sites sent per-patient sums for every case, on the "
        "effective sample size n / max(1, deff) (Korn and Graubard 1998), deff the design "
        "effect of the cluster-robust variance (ratio estimator with patients as clusters, "
        "sites' patients pooled as one sample)"
    ),
    "auc": (
        "within a site: the exact AUC (Mann-Whitney count the site sent) with DeLong's "
        "variance of its cases, or Obuchowski's clustered variance (patients as clusters) "
        "where larger; pooled over sites: pairs within a site exact, pairs across sites from "
        "the merged score histograms, DeLong variance from the merged histograms (without "
        "the patient clustering), widened on each side by the tie bound of the pairs not "
        "counted exactly (cases sharing a bin, more where bins were merged for k); logit "
        f"scale; an AUC that is not exact is withheld when its tie bound exceeds {MAX_TIE_BOUND}"
    ),
    "design_effect": (
        "the cluster-robust variance over the variance that takes every image as "
        "independent (1 with one image per patient); intervals use max(1, deff)"
    ),
    "mean": "t interval of the exact mean, variance from the merged histogram (bin midpoints)",
    "difference": (
        "Newcombe hybrid score (proportions); MOVER from the two AUCs' own intervals (AUC); "
        "Welch (means); at the false-coverage-rate-adjusted level of the comparison's family "
        "(see gaps)"
    ),
    "ratio": "Katz log (proportions); delta method on the log scale (AUC, means)",
    "plain": "no interval (AP and FROC need per-image resampling, which no site sends)",
    "noise": (
        "sites with DP statistics send noisy counts: each interval is that of the counts "
        "taken as exact, widened on each side in quadrature by z times the noise's standard "
        "error (delta method, from the noise variance the site states), around the noisy "
        "estimate (MOVER, Zou and Donner 2008)"
    ),
}


@dataclass(frozen=True)
class Metric:
    """An estimate, whether higher values are better (for worst/best), and whether groups
    are compared on it (accuracy, for one, mostly reflects a group's prevalence)."""

    estimate: Estimate
    higher_is_better: bool = True
    compared: bool = True


def estimates(stats: object) -> dict[str, Metric]:
    """The metrics of the bias report for a task's statistics, with what they come from."""
    if isinstance(stats, BinaryStats):
        above, below = stats.count_noise()
        return {
            "auc": Metric(
                Auc(
                    stats.pos_hist,
                    stats.neg_hist,
                    stats.noise,
                    stats.exact,
                    _sent(stats.auc_clusters),
                )
            ),
            "sensitivity": Metric(
                Proportion(
                    stats.tp,
                    stats.tp + stats.fn,
                    (above, below),
                    _sent(stats.sens_clusters),
                )
            ),
            "specificity": Metric(
                Proportion(
                    stats.tn,
                    stats.tn + stats.fp,
                    (below, above),
                    _sent(stats.spec_clusters),
                )
            ),
            "accuracy": Metric(
                Proportion(stats.tp + stats.tn, stats.n, (above + below, above + below)),
                compared=False,
            ),
            "ece": Metric(
                Plain(binary_metrics(stats)["ece"]),
                higher_is_better=False,
                compared=False,
            ),
        }
    if isinstance(stats, MulticlassStats):
        values = multiclass_metrics(stats)
        correct = sum(stats.confusion[c][c] for c in range(stats.classes))
        return {
            "accuracy": Metric(Proportion(correct, stats.n)),
            "auc": Metric(Plain(values["auc"]), compared=False),
            "balanced_accuracy": Metric(Plain(values["balanced_accuracy"]), compared=False),
        }
    if isinstance(stats, SegmentationStats):
        return {
            "dice_mean": Metric(Mean(stats.dice_hist, stats.dice_sum, 0.0, 1.0)),
            "iou_mean": Metric(Mean(stats.iou_hist, stats.iou_sum, 0.0, 1.0), compared=False),
            "hd95_mean": Metric(
                Mean(stats.hd95_hist, stats.hd95_sum, 0.0, stats.hd95_max), higher_is_better=False
            ),
            "fp_case_rate": Metric(
                Proportion(stats.false_positive, stats.true_negative + stats.false_positive),
                higher_is_better=False,
            ),
            "miss_rate": Metric(
                Proportion(stats.missed, stats.missed + stats.segmented), higher_is_better=False
            ),
        }
    if isinstance(stats, DetectionStats):
        values = detection_metrics(stats)
        return {
            "ap50": Metric(Plain(values["ap50"])),
            "ap50_95": Metric(Plain(values["ap50_95"]), compared=False),
            "froc_mean": Metric(Plain(values["froc_mean"])),
        }
    msg = f"no bias-report metrics for {type(stats).__name__}"
    raise TypeError(msg)


def _sent(clusters: _Clusters) -> _Clusters | None:
    """Per-patient sums a site sent, or None (none sent: zero patients)."""
    return clusters if clusters.clusters else None


def _noisy(estimate: Estimate) -> bool:
    if isinstance(estimate, Proportion):
        return any(v > 0 for v in estimate.noise)
    return isinstance(estimate, Auc) and estimate.noise > 0


def _as_exact(estimate: Estimate) -> Estimate:
    """The noisy counts as exact ones (negative counts as 0), for the sampling part of an
    interval; an exact estimate unchanged."""
    if isinstance(estimate, Proportion) and _noisy(estimate):
        trials = max(estimate.trials, 0)
        return Proportion(min(max(estimate.successes, 0), trials), trials)
    if isinstance(estimate, Auc) and _noisy(estimate):
        return Auc(tuple(max(v, 0) for v in estimate.pos), tuple(max(v, 0) for v in estimate.neg))
    return estimate


def _noise_se(estimate: Estimate) -> float | None:
    """The standard error the noise adds to a noisy estimate (0 when exact)."""
    if isinstance(estimate, Proportion) and _noisy(estimate):
        failures = estimate.trials - estimate.successes
        return iv.proportion_noise_se(estimate.successes, failures, *estimate.noise)
    if isinstance(estimate, Auc) and _noisy(estimate):
        return iv.auc_noise_se(estimate.pos, estimate.neg, estimate.noise)
    return 0.0


def _noisy_value(estimate: Estimate) -> float | None:
    if isinstance(estimate, Proportion):
        return noisy_ratio(estimate.successes, estimate.trials)
    assert isinstance(estimate, Auc)
    return noisy_auc(estimate.pos, estimate.neg)


def interval(estimate: Estimate, confidence: float) -> Interval:
    """The value of an estimate with its interval; for noisy counts, the interval of the
    counts taken as exact, widened in quadrature by the noise's (``radfed.metrics.intervals
    .add_noise``) around the noisy estimate."""
    if _noisy(estimate):
        se = _noise_se(estimate)
        value = _noisy_value(estimate)
        if se is None or value is None:
            return Interval(None)
        fit = interval(_as_exact(estimate), confidence)
        return iv.add_noise(fit, value, iv.z_value(confidence) * se, lowest=0.0, highest=1.0)
    if isinstance(estimate, Proportion):
        return iv.wilson(
            estimate.successes,
            estimate.trials,
            confidence=confidence,
            design_effect=_inflation(_proportion_deff(estimate)),
        )
    if isinstance(estimate, Auc):
        auc = _auc_fit(estimate)
        if auc is None or withheld(auc):
            return Interval(None)
        fit = iv.logit_auc_interval(auc.value, auc.variance, confidence=confidence)
        return _widen(fit, auc.tie, 0.0, 1.0)
    if isinstance(estimate, Mean):
        try:
            return iv.mean_from_histogram(
                estimate.hist,
                estimate.total,
                low=estimate.low,
                high=estimate.high,
                confidence=confidence,
            )
        except ValueError:  # a sum at the edge of its range by rounding: no interval
            n = sum(estimate.hist)
            return Interval(estimate.total / n if n else None, None, None)
    return Interval(estimate.value, None, None)


def _auc_fit(estimate: Auc) -> AucFit | None:
    return fit_auc(estimate.pos, estimate.neg, estimate.exact, estimate.clusters)


def _proportion_deff(estimate: Proportion) -> float | None:
    if estimate.clusters is None or _noisy(estimate):
        return None
    return proportion_design_effect(estimate.clusters, estimate.successes, estimate.trials)


def _inflation(deff: float | None) -> float:
    """The design effect an interval uses: at least 1 (Korn and Graubard)."""
    return 1.0 if deff is None else max(1.0, deff)


def design_effect(estimate: Estimate) -> float | None:
    """The design effect of an estimate: its cluster-robust variance (patients as clusters)
    over the variance that takes every image as independent, as estimated (it may be
    below 1; intervals use ``max(1, deff)``). None where the sites sent no per-patient
    sums covering every case (DP statistics, too few patients, a pooled AUC of several
    sites), or where the variance is undefined (a proportion of 0 or 1)."""
    if isinstance(estimate, Proportion):
        return _proportion_deff(estimate)
    if isinstance(estimate, Auc) and not _noisy(estimate):
        fit = _auc_fit(estimate)
        return None if fit is None or withheld(fit) else fit.design_effect
    return None


def is_exact(estimate: Estimate) -> bool:
    """Whether an AUC is the exact AUC of its cases (every positive-negative pair counted
    from a site's exact Mann-Whitney count: a cell of one site that sent it); False for
    every other estimate."""
    if not isinstance(estimate, Auc) or _noisy(estimate):
        return False
    fit = _auc_fit(estimate)
    return fit is not None and fit.exact


def tie_bound(estimate: Estimate) -> float | None:
    """How far an AUC can be from the exact AUC of its cases: 0 when exact, else half the
    share of the pairs not counted exactly that share a bin (``radfed.metrics.exact_auc
    .pooled_auc``); None for other estimates and noisy or undefined AUCs."""
    if not isinstance(estimate, Auc) or _noisy(estimate):
        return None
    fit = _auc_fit(estimate)
    return None if fit is None else fit.tie


def _widen(fit: Interval, by: float, lowest: float, highest: float) -> Interval:
    """An interval widened on both sides by ``by`` (the tie bound), within the range."""
    if fit.value is None:
        return fit
    low = fit.low if fit.low is not None else fit.value
    high = fit.high if fit.high is not None else fit.value
    if fit.low is None and by == 0:
        return fit
    return Interval(fit.value, max(lowest, low - by), min(highest, high + by))


def compare(worst: Estimate, best: Estimate, confidence: float) -> tuple[Interval, Interval]:
    """Difference (worst - best) and ratio (worst / best) of two disjoint groups' estimates;
    for noisy counts, the intervals of the counts taken as exact, widened in quadrature by
    the two groups' noise (independent between groups)."""
    if _noisy(worst) or _noisy(best):
        return _compare_noisy(worst, best, confidence)
    if isinstance(worst, Proportion) and isinstance(best, Proportion):
        args = (worst.successes, worst.trials, best.successes, best.trials)
        effects = (_inflation(_proportion_deff(worst)), _inflation(_proportion_deff(best)))
        return (
            iv.newcombe_difference(*args, confidence=confidence, design_effects=effects),
            iv.proportion_ratio(*args, confidence=confidence, design_effects=effects),
        )
    if isinstance(worst, Auc) and isinstance(best, Auc):
        return _compare_auc(worst, best, confidence)
    if isinstance(worst, Mean) and isinstance(best, Mean):
        a, b = (worst.hist, worst.total), (best.hist, best.total)
        bounds = {"low": worst.low, "high": max(worst.high, best.high), "confidence": confidence}
        return iv.mean_difference(a, b, **bounds), iv.mean_ratio(a, b, **bounds)
    first, second = interval(worst, confidence).value, interval(best, confidence).value
    diff = None if first is None or second is None else first - second
    quotient = None if first is None or not second else first / second
    return Interval(diff, None, None), Interval(quotient, None, None)


def _compare_auc(worst: Auc, best: Auc, confidence: float) -> tuple[Interval, Interval]:
    """Difference and ratio of two disjoint groups' AUCs. The difference's interval is
    MOVER (Zou and Donner 2008) from each AUC's own interval (logit scale, widened by its
    tie bound): a raw-scale normal interval collapses as an AUC nears 1, where DeLong's
    variance goes to 0, and falsely flags small groups with near-perfect AUCs; without an
    interval on either side (an AUC of 0 or 1, or a class of one case) the difference has
    none. The ratio: delta method on the log scale, widened by the tie bounds."""
    fa, fb = _auc_fit(worst), _auc_fit(best)
    if fa is None or fb is None or withheld(fa) or withheld(fb):
        return Interval(None), Interval(None)
    z = iv.z_value(confidence)
    gap = iv.mover_difference(interval(worst, confidence), interval(best, confidence))
    if fb.value == 0:
        return gap, Interval(None)
    r = fa.value / fb.value
    if fa.variance is None or fb.variance is None or fa.value == 0:
        return gap, Interval(r)
    se = math.sqrt(fa.variance / fa.value**2 + fb.variance / fb.value**2)
    low, high = r * math.exp(-z * se), r * math.exp(z * se)
    if fa.tie or fb.tie:
        low *= max(0.0, 1 - fa.tie / fa.value) / (1 + fb.tie / fb.value)
        high *= (1 + fa.tie / fa.value) / max(1 - fb.tie / fb.value, 1e-9)
    return gap, Interval(r, low, high)


def _compare_noisy(worst: Estimate, best: Estimate, confidence: float) -> tuple[Interval, Interval]:
    se_a, se_b = _noise_se(worst), _noise_se(best)
    a, b = interval(worst, confidence).value, interval(best, confidence).value
    if se_a is None or se_b is None or a is None or b is None:
        return Interval(None), Interval(None)
    z = iv.z_value(confidence)
    gap, share = compare(_as_exact(worst), _as_exact(best), confidence)
    difference = iv.add_noise(gap, a - b, z * math.hypot(se_a, se_b), lowest=-1.0, highest=1.0)
    if a <= 0 or b <= 0:
        return difference, Interval(a / b if b else None)
    ratio = iv.ratio_with_noise(share, a / b, z * math.hypot(se_a / a, se_b / b))
    return difference, ratio
