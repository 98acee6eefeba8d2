"""What each metric is estimated from, so that intervals and group differences can be computed.

A metric of merged statistics is a proportion of counts, an AUC of score histograms, a mean
of a histogrammed per-case value with its exact sum, or a plain value without an interval
(AP, FROC). ``estimates`` maps a task's statistics to these; ``interval`` and ``compare``
turn them into intervals (methods named in ``METHODS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from radfed.metrics import intervals as iv
from radfed.metrics.binary import BinaryStats, auc_tie_bound, expected_calibration_error
from radfed.metrics.detection import DetectionStats, detection_metrics
from radfed.metrics.intervals import Interval
from radfed.metrics.multiclass import MulticlassStats, multiclass_metrics
from radfed.metrics.segmentation import SegmentationStats

__all__ = [
    "METHODS",
    "Auc",
    "Estimate",
    "Mean",
    "Metric",
    "Plain",
    "Proportion",
    "compare",
    "estimates",
    "interval",
]


@dataclass(frozen=True)
class Proportion:
    """``successes`` of ``trials``."""

    successes: int
    trials: int


@dataclass(frozen=True)
class Auc:
    """ROC AUC of positive and negative score histograms."""

    pos: tuple[int, ...]
    neg: tuple[int, ...]


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

#: The interval method of each kind of estimate, as the report names it.
METHODS = {
    "proportion": "Wilson score interval",
    "auc": (
        "DeLong variance from the merged score histograms (logit scale), widened on each side "
        "by the histogram tie bound (cases sharing a bin, more where bins were merged for k)"
    ),
    "mean": "t interval of the exact mean, variance from the merged histogram (bin midpoints)",
    "difference": (
        "Newcombe hybrid score (proportions); DeLong variances added (AUC); Welch (means); "
        "Bonferroni-adjusted for the group pairs of each attribute"
    ),
    "ratio": "Katz log (proportions); delta method on the log scale (AUC, means)",
    "plain": "no interval (AP and FROC need per-image resampling, which no site sends)",
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
        return {
            "auc": Metric(Auc(stats.pos_hist, stats.neg_hist)),
            "sensitivity": Metric(Proportion(stats.tp, stats.tp + stats.fn)),
            "specificity": Metric(Proportion(stats.tn, stats.tn + stats.fp)),
            "accuracy": Metric(Proportion(stats.tp + stats.tn, stats.n), compared=False),
            "ece": Metric(
                Plain(expected_calibration_error(stats.pos_hist, stats.neg_hist)),
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


def interval(estimate: Estimate, confidence: float) -> Interval:
    """The value of an estimate with its interval."""
    if isinstance(estimate, Proportion):
        return iv.wilson(estimate.successes, estimate.trials, confidence=confidence)
    if isinstance(estimate, Auc):
        fit = iv.delong_auc(estimate.pos, estimate.neg, confidence=confidence)
        return _widen(fit, _tie(estimate), 0.0, 1.0)
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


def _tie(estimate: Auc) -> float:
    """How far the histogram AUC can be from the exact AUC of the cases (bins shared by
    positives and negatives; coarser where bins were merged for privacy)."""
    return auc_tie_bound(estimate.pos, estimate.neg) or 0.0


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
    """Difference (worst - best) and ratio (worst / best) of two disjoint groups' estimates."""
    if isinstance(worst, Proportion) and isinstance(best, Proportion):
        args = (worst.successes, worst.trials, best.successes, best.trials)
        return (
            iv.newcombe_difference(*args, confidence=confidence),
            iv.proportion_ratio(*args, confidence=confidence),
        )
    if isinstance(worst, Auc) and isinstance(best, Auc):
        pair = ((worst.pos, worst.neg), (best.pos, best.neg))
        tie_a, tie_b = _tie(worst), _tie(best)
        gap = _widen(iv.auc_difference(*pair, confidence=confidence), tie_a + tie_b, -1.0, 1.0)
        share = iv.auc_ratio(*pair, confidence=confidence)
        if (tie_a or tie_b) and share.low is not None and share.high is not None:
            wa = interval(worst, confidence).value or 0.0
            wb = interval(best, confidence).value or 0.0
            if wa and wb:
                share = Interval(
                    share.value,
                    share.low * max(0.0, 1 - tie_a / wa) / (1 + tie_b / wb),
                    share.high * (1 + tie_a / wa) / max(1 - tie_b / wb, 1e-9),
                )
        return gap, share
    if isinstance(worst, Mean) and isinstance(best, Mean):
        a, b = (worst.hist, worst.total), (best.hist, best.total)
        bounds = {"low": worst.low, "high": max(worst.high, best.high), "confidence": confidence}
        return iv.mean_difference(a, b, **bounds), iv.mean_ratio(a, b, **bounds)
    first, second = interval(worst, confidence).value, interval(best, confidence).value
    diff = None if first is None or second is None else first - second
    quotient = None if first is None or not second else first / second
    return Interval(diff, None, None), Interval(quotient, None, None)
