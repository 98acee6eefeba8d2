"""Binary classification metrics from mergeable sufficient statistics.

A site summarises its per-case scores as confusion counts at the operating threshold
plus positive and negative score histograms; the server sums these over sites and
computes every number from the sums, so a pooled value is the value on the pooled cases:
exactly for counts, and for AUC within the tie bound of ``auc_tie_bound``.

A site with DP statistics (``radfed.privacy.statistics_dp``) sends noisy histograms instead
and derives its confusion counts from them; ``noise`` is then the variance of each bin's
noise (summed over sites when pooled), counts may be negative, and the metrics are the
noisy estimates, clipped to their range.

A site also sends, for a released cell with at least ``k`` positives and ``k`` negatives, the
exact Mann-Whitney count of its own pairs (``radfed.metrics.exact_auc``) and sums over its
patients for cluster-robust variances (``radfed.metrics.clusters``); both add over sites.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from radfed.metrics.clusters import (
    AucClusters,
    ProportionClusters,
    auc_clusters,
    patient_groups,
    proportion_clusters,
)
from radfed.metrics.exact_auc import ExactAuc, placements2, pooled_auc
from radfed.metrics.histograms import merge_mixed_bins, merge_sparse_bins

__all__ = [
    "BinaryStats",
    "BinaryStatsAccumulator",
    "accuracy",
    "auc_from_histograms",
    "auc_tie_bound",
    "auc_with_bound",
    "binary_metrics",
    "expected_calibration_error",
    "noisy_auc",
    "noisy_ratio",
    "sensitivity",
    "specificity",
    "threshold_bin",
]


def threshold_bin(threshold: float, bins: int) -> int | None:
    """The first of ``bins`` equal score bins at or above ``threshold`` when the threshold
    falls on a bin edge (``score >= threshold`` is then exactly those bins), else None."""
    edge = threshold * bins
    return round(edge) if abs(edge - round(edge)) < 1e-9 else None


@dataclass(frozen=True)
class BinaryStats:
    """Sufficient statistics of binary predictions; adding two gives the pooled statistics.

    Attributes:
        tp, fp, tn, fn: confusion counts at the threshold (``score >= threshold`` is positive).
        pos_hist: counts of positive cases per score bin, shape ``(B,)``.
        neg_hist: counts of negative cases per score bin, shape ``(B,)``.
        suppressed: the cell held fewer cases than the site's minimum cell size; every
            count is zero and the cell is left out of pooled values.
        noise: the variance of the noise of every histogram bin (0: exact counts); the
            confusion counts are then sums of the noisy bins each side of the threshold.
        threshold_bin: the first bin at or above the threshold (the site merges sparse
            bins on each side of it apart); not sent.
        exact: the exact Mann-Whitney parts of the sites that sent them (empty when none).
        sens_clusters, spec_clusters: the per-patient sums of sensitivity and specificity
            (``radfed.metrics.clusters``; empty when not sent).
        auc_clusters: the per-patient sums of Obuchowski's AUC variance.
    """

    tp: int
    fp: int
    tn: int
    fn: int
    pos_hist: tuple[int, ...]
    neg_hist: tuple[int, ...]
    suppressed: bool = False
    noise: float = 0.0
    threshold_bin: int | None = field(default=None, compare=False, repr=False)
    exact: ExactAuc = field(default_factory=ExactAuc)
    sens_clusters: ProportionClusters = field(default_factory=ProportionClusters)
    spec_clusters: ProportionClusters = field(default_factory=ProportionClusters)
    auc_clusters: AucClusters = field(default_factory=AucClusters)
    #: patients with images of both classes, with two or more positives, with two or more
    #: negatives (kept at the site: ``with_min_cell`` withholds sums these would expose)
    profile: tuple[int, int, int] = field(default=(0, 0, 0), compare=False, repr=False)

    @classmethod
    def empty(cls, bins: int, *, suppressed: bool = False) -> BinaryStats:
        zeros = (0,) * bins
        return cls(0, 0, 0, 0, zeros, zeros, suppressed)

    @classmethod
    def from_scores(
        cls,
        scores: np.ndarray,
        labels: np.ndarray,
        *,
        threshold: float = 0.5,
        bins: int = 1000,
        exact: bool = False,
        patients: Sequence[str] = (),
    ) -> BinaryStats:
        """Summarise per-case scores.

        Args:
            scores: predicted probabilities in [0, 1], shape ``(N,)``.
            labels: 0/1 labels, shape ``(N,)``.
            threshold: operating threshold.
            bins: number of equal-width score bins on [0, 1].
            exact: also the exact Mann-Whitney parts and the per-patient sums (a site's
                cell; ``with_min_cell`` decides which of them may leave).
            patients: each case's patient key, shape ``(N,)``, used for the sums only
                (never kept); empty: every case its own patient.
        """
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels).reshape(-1).astype(bool)
        if scores.shape != labels.shape:
            msg = f"scores and labels differ in length: {scores.shape[0]} vs {labels.shape[0]}"
            raise ValueError(msg)
        if scores.size and (not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1):
            msg = "scores must be finite probabilities in [0, 1]"
            raise ValueError(msg)
        predicted = scores >= threshold
        index = np.minimum((scores * bins).astype(np.int64), bins - 1)
        stats = cls(
            tp=int(np.sum(predicted & labels)),
            fp=int(np.sum(predicted & ~labels)),
            tn=int(np.sum(~predicted & ~labels)),
            fn=int(np.sum(~predicted & labels)),
            pos_hist=tuple(int(v) for v in np.bincount(index[labels], minlength=bins)),
            neg_hist=tuple(int(v) for v in np.bincount(index[~labels], minlength=bins)),
            threshold_bin=threshold_bin(threshold, bins),
        )
        if not exact:
            return stats
        p, n = int(labels.sum()), int((~labels).sum())
        group = patient_groups(tuple(patients), scores.size)
        stats = dataclasses.replace(
            stats,
            sens_clusters=proportion_clusters(predicted[labels], group[labels]),
            spec_clusters=proportion_clusters(~predicted[~labels], group[~labels]),
            profile=_profile(group, labels),
        )
        if p == 0 or n == 0:
            return stats
        a, b = placements2(scores, labels)
        v10, v01 = a / (2.0 * n), b / (2.0 * p)
        parts = ExactAuc(
            pairs=p * n, mw2=int(a.sum()), v10_sq=float(v10 @ v10), v01_sq=float(v01 @ v01)
        )
        return dataclasses.replace(
            stats,
            exact=parts.on_histograms(stats.pos_hist, stats.neg_hist),
            auc_clusters=auc_clusters(v10, group[labels], v01, group[~labels]),
        )

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def count_noise(self) -> tuple[float, float]:
        """The noise variances of the counts at and above the threshold (``tp``, ``fp``)
        and below it (``fn``, ``tn``): the bins each sums; every bin when the threshold is
        not on a bin edge."""
        bins = len(self.pos_hist)
        if self.threshold_bin is None:
            return self.noise * bins, self.noise * bins
        return self.noise * (bins - self.threshold_bin), self.noise * self.threshold_bin

    def with_min_cell(self, k: int) -> BinaryStats:
        """What may leave a site under a minimum cell size ``k``.

        Fewer than ``k`` cases: a suppressed cell without counts. Otherwise adjacent score
        bins are merged (from low to high scores) until every non-empty bin holds at least
        ``k`` cases, so no bin pins down the score and label of fewer than ``k`` cases; a
        merged run is stored in its first bin, and no run crosses the threshold (the
        confusion counts would cut it). The AUC of the result stays within its own
        ``auc_tie_bound`` of the exact AUC.

        The exact Mann-Whitney parts leave only with at least ``k`` positives and ``k``
        negatives, and then the histograms are merged further until every bin holding both
        classes holds at least ``k`` of each (else the count would order the cases inside
        a small bin; ``merge_mixed_bins``). The per-patient sums
        of sensitivity (specificity) leave only where no patient holds more than ``1 / k``
        of the positives (negatives) and the patients with several positive (negative)
        images are none or at least ``k``; those of the AUC only with the exact parts, on
        both conditions, and where the patients with images of both classes are none or at
        least ``k`` (docs/privacy.md says which attack each rule stops).
        """
        if k <= 1:
            return self
        if self.n < k:
            return BinaryStats.empty(len(self.pos_hist), suppressed=True)
        pos, neg = merge_sparse_bins((self.pos_hist, self.neg_hist), k, split_at=self.threshold_bin)
        positives, negatives = self.tp + self.fn, self.tn + self.fp
        exact = ExactAuc()
        if self.exact and positives >= k and negatives >= k:
            # bins shared by both classes hold k of each: no order inside a small bin
            mixed_ok = merge_mixed_bins(pos, neg, k, split_at=self.threshold_bin)
            if mixed_ok is not None:
                pos, neg = mixed_ok
                exact = self.exact.on_histograms(pos, neg)
        mixed, multi_pos, multi_neg = self.profile
        sens, spec, auc = self.sens_clusters, self.spec_clusters, self.auc_clusters
        if _few(multi_pos, k):  # the sums would single out a patient of several positives
            sens, auc = ProportionClusters(), AucClusters()
        if _few(multi_neg, k):
            spec, auc = ProportionClusters(), AucClusters()
        if _few(mixed, k):  # the AUC's cross sums would isolate a patient of both classes
            auc = AucClusters()
        return BinaryStats(
            self.tp,
            self.fp,
            self.tn,
            self.fn,
            pos,
            neg,
            exact=exact,
            sens_clusters=sens if sens.releasable(k) else ProportionClusters(),
            spec_clusters=spec if spec.releasable(k) else ProportionClusters(),
            auc_clusters=auc if exact and auc.releasable(k) else AucClusters(),
        )

    def withholding(self, part: str) -> BinaryStats:
        """No part of a binary cell is withheld by a count of its own that sums over cells:
        the exact pair count and the per-patient sums are released by rules on the whole
        cell (``with_min_cell``), and their values do not add up over linked cells."""
        raise ValueError(f"binary statistics have no part {part!r} to withhold")

    def without_exact_auc(self) -> BinaryStats:
        """The statistics without the exact pair count and the AUC's per-patient sums (a
        site whose policy does not send them)."""
        return dataclasses.replace(self, exact=ExactAuc(), auc_clusters=AucClusters())

    def without_clusters(self) -> BinaryStats:
        """The statistics without any per-patient sums."""
        return dataclasses.replace(
            self,
            sens_clusters=ProportionClusters(),
            spec_clusters=ProportionClusters(),
            auc_clusters=AucClusters(),
        )

    def __add__(self, other: BinaryStats) -> BinaryStats:
        if len(self.pos_hist) != len(other.pos_hist):
            msg = f"cannot merge histograms of {len(self.pos_hist)} and {len(other.pos_hist)} bins"
            raise ValueError(msg)
        return BinaryStats(
            tp=self.tp + other.tp,
            fp=self.fp + other.fp,
            tn=self.tn + other.tn,
            fn=self.fn + other.fn,
            pos_hist=tuple(a + b for a, b in zip(self.pos_hist, other.pos_hist, strict=True)),
            neg_hist=tuple(a + b for a, b in zip(self.neg_hist, other.neg_hist, strict=True)),
            noise=self.noise + other.noise,
            threshold_bin=self.threshold_bin
            if other.threshold_bin is None
            else other.threshold_bin,
            exact=self.exact + other.exact,
            sens_clusters=self.sens_clusters + other.sens_clusters,
            spec_clusters=self.spec_clusters + other.spec_clusters,
            auc_clusters=self.auc_clusters + other.auc_clusters,
        )


def _few(count: int, k: int) -> bool:
    """Between 1 and ``k - 1``: a count of patients that could single one out."""
    return 0 < count < k


def _profile(group: np.ndarray, labels: np.ndarray) -> tuple[int, int, int]:
    """Patients with images of both classes, with two or more positive images, and with
    two or more negative ones."""
    if group.size == 0:
        return (0, 0, 0)
    _, local = np.unique(group, return_inverse=True)
    pos = np.bincount(local[labels], minlength=local.max() + 1)
    neg = np.bincount(local[~labels], minlength=local.max() + 1)
    return (int(np.sum((pos > 0) & (neg > 0))), int(np.sum(pos > 1)), int(np.sum(neg > 1)))


class BinaryStatsAccumulator:
    """Stateful accumulator over batches (MONAI style: ``append``, ``aggregate``, ``reset``)."""

    def __init__(self, *, threshold: float = 0.5, bins: int = 1000) -> None:
        self.threshold = threshold
        self.bins = bins
        self._stats = BinaryStats.empty(bins)

    def append(self, scores: np.ndarray, labels: np.ndarray) -> None:
        batch = BinaryStats.from_scores(scores, labels, threshold=self.threshold, bins=self.bins)
        self._stats = self._stats + batch

    def aggregate(self) -> BinaryStats:
        return self._stats

    def reset(self) -> None:
        self._stats = BinaryStats.empty(self.bins)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def sensitivity(s: BinaryStats) -> float | None:
    """True positive rate at the threshold; None without positives."""
    return _ratio(s.tp, s.tp + s.fn)


def specificity(s: BinaryStats) -> float | None:
    """True negative rate at the threshold; None without negatives."""
    return _ratio(s.tn, s.tn + s.fp)


def accuracy(s: BinaryStats) -> float | None:
    """Share of correct decisions at the threshold; None without cases."""
    return _ratio(s.tp + s.tn, s.n)


def auc_from_histograms(
    pos_hist: np.ndarray | tuple[int, ...], neg_hist: np.ndarray | tuple[int, ...]
) -> float | None:
    """ROC AUC from score histograms (Mann-Whitney, pairs within one bin count one half).

    Returns None unless both classes are present.
    """
    pos = np.asarray(pos_hist, dtype=np.float64)
    neg = np.asarray(neg_hist, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.concatenate(([0.0], np.cumsum(neg)[:-1]))
    wins = float(np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg))
    return wins / float(n_pos * n_neg)


def auc_tie_bound(
    pos_hist: np.ndarray | tuple[int, ...], neg_hist: np.ndarray | tuple[int, ...]
) -> float | None:
    """Largest possible difference between the histogram AUC and the exact AUC.

    Only positive-negative pairs that share a bin can be ordered either way; each counts
    one half in the histogram AUC and 0, 1/2 or 1 in the exact AUC.
    """
    pos = np.asarray(pos_hist, dtype=np.float64)
    neg = np.asarray(neg_hist, dtype=np.float64)
    pairs = float(pos.sum() * neg.sum())
    return 0.5 * float(np.sum(pos * neg)) / pairs if pairs else None


def auc_with_bound(s: BinaryStats) -> tuple[float, float] | None:
    """The AUC of (pooled) statistics and its tie bound: exact for the pairs within each
    site that sent its exact count, from the histograms for the others
    (``radfed.metrics.exact_auc.pooled_auc``); None unless both classes are present.
    Exact statistics only (noisy ones: ``noisy_auc``)."""
    return pooled_auc(s.pos_hist, s.neg_hist, s.exact)


def expected_calibration_error(
    pos_hist: np.ndarray | tuple[int, ...],
    neg_hist: np.ndarray | tuple[int, ...],
    groups: int = 10,
) -> float | None:
    """Expected calibration error over ``groups`` equal-width probability bins.

    ``sum_g n_g / N * |observed positive rate_g - mean predicted probability_g|``, as
    scikit-learn's ``calibration_curve(strategy="uniform")`` bins it. Each case's
    probability is taken at the midpoint of its histogram bin (within half a bin width; a
    run of bins merged for the cell size sits at its first bin). None without cases.
    """
    pos = np.asarray(pos_hist, dtype=np.float64)
    neg = np.asarray(neg_hist, dtype=np.float64)
    total = pos + neg
    if total.sum() == 0:
        return None
    bins = len(total)
    middle = (np.arange(bins) + 0.5) / bins
    group = np.minimum((middle * groups).astype(np.int64), groups - 1)
    count = np.bincount(group, weights=total, minlength=groups)
    observed = np.bincount(group, weights=pos, minlength=groups)
    predicted = np.bincount(group, weights=total * middle, minlength=groups)
    used = count > 0
    gap = np.abs(observed[used] - predicted[used])  # n_g * |rate_g - confidence_g|
    return float(gap.sum() / total.sum())


def binary_metrics(s: BinaryStats) -> dict[str, float | None]:
    """Every reported metric of one set of statistics (None where undefined).

    ``auc_tie_bound`` is the largest possible distance of ``auc`` from the exact AUC of
    the cases (the histograms' resolution, coarser where bins were merged for privacy; 0
    where every pair is covered by a site's exact count, ``auc_with_bound``).
    Noisy statistics give the noisy estimates clipped to [0, 1], None where a noisy count
    of cases is not above 0; their tie bound and calibration error come from the
    histograms with negative bins taken as empty.
    """
    if s.noise > 0:
        return _noisy_metrics(s)
    fit = auc_with_bound(s)
    prevalence = _ratio(s.tp + s.fn, s.n)
    out = {
        "auc": None if fit is None else fit[0],
        "sensitivity": sensitivity(s),
        "specificity": specificity(s),
        "accuracy": accuracy(s),
        "prevalence": prevalence,
        "auc_tie_bound": None if fit is None else fit[1],
        "ece": expected_calibration_error(s.pos_hist, s.neg_hist),
    }
    return {k: (None if v is None or math.isnan(v) else round(v, 6)) for k, v in out.items()}


def noisy_ratio(num: float, den: float) -> float | None:
    """A proportion of noisy counts, clipped to [0, 1]; None unless ``den > 0``."""
    return min(max(num / den, 0.0), 1.0) if den > 0 else None


def noisy_auc(pos_hist: tuple[int, ...], neg_hist: tuple[int, ...]) -> float | None:
    """The Mann-Whitney AUC of noisy histograms, clipped to [0, 1]; None unless both
    classes' noisy totals are above 0."""
    if sum(pos_hist) <= 0 or sum(neg_hist) <= 0:
        return None
    auc = auc_from_histograms(pos_hist, neg_hist)
    return None if auc is None else min(max(auc, 0.0), 1.0)


def _noisy_metrics(s: BinaryStats) -> dict[str, float | None]:
    pos = tuple(max(v, 0) for v in s.pos_hist)
    neg = tuple(max(v, 0) for v in s.neg_hist)
    out = {
        "auc": noisy_auc(s.pos_hist, s.neg_hist),
        "sensitivity": noisy_ratio(s.tp, s.tp + s.fn),
        "specificity": noisy_ratio(s.tn, s.tn + s.fp),
        "accuracy": noisy_ratio(s.tp + s.tn, s.n),
        "prevalence": noisy_ratio(s.tp + s.fn, s.n),
        "auc_tie_bound": auc_tie_bound(pos, neg),
        "ece": expected_calibration_error(pos, neg),
    }
    return {k: (None if v is None or math.isnan(v) else round(v, 6)) for k, v in out.items()}
