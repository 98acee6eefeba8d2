"""The AUC of (pooled) exact statistics with its tie bound, variance and design effect."""

from __future__ import annotations

from typing import NamedTuple

from radfed.metrics import intervals as iv
from radfed.metrics.clusters import AucClusters, auc_design_effect, obuchowski_variance
from radfed.metrics.exact_auc import ExactAuc, exact_delong_variance, pooled_auc

__all__ = ["MAX_TIE_BOUND", "AucFit", "fit_auc", "withheld"]

#: The largest tie bound at which an AUC that is not exact is still shown: beyond it, the
#: order of the pairs that share a (merged) bin could move the AUC by more than this.
MAX_TIE_BOUND = 0.05


class AucFit(NamedTuple):
    """An AUC as the bias report uses it.

    Attributes:
        value: the AUC (``radfed.metrics.exact_auc.pooled_auc``).
        tie: how far from the exact AUC of the cases the value can be (0 when exact).
        variance: the variance its interval uses: DeLong's of the cases when exact (or
            Obuchowski's clustered one where larger), else DeLong's of the histograms.
        design_effect: Obuchowski's variance over DeLong's, as estimated; None without
            per-patient sums covering the cases.
        exact: every positive-negative pair was counted from a site's exact count.
    """

    value: float
    tie: float
    variance: float | None
    design_effect: float | None
    exact: bool


def fit_auc(
    pos: tuple[int, ...], neg: tuple[int, ...], exact: ExactAuc, clusters: AucClusters | None
) -> AucFit | None:
    """The AUC of exact (not noisy) statistics; None unless both classes are present."""
    fit = pooled_auc(pos, neg, exact)
    if fit is None:
        return None
    value, tie = fit
    positives, negatives = sum(pos), sum(neg)
    is_exact = exact.pairs == positives * negatives
    clustered = None
    if is_exact:
        independent = exact_delong_variance(exact, positives, negatives)
        if clusters is not None:
            clustered = obuchowski_variance(clusters, value, positives, negatives)
    else:
        independent = iv.delong_variance(pos, neg)
    deff = auc_design_effect(clustered, independent)
    variance = independent
    if deff is not None and clustered is not None:
        variance = max(clustered, independent or 0.0)  # the design effect floored at 1
    return AucFit(value, tie, variance, deff, is_exact)


def withheld(fit: AucFit) -> bool:
    """An AUC too coarse to mean anything: not exact, and the order of the pairs sharing a
    bin could move it by more than ``MAX_TIE_BOUND`` (a cell whose cases were all merged
    into one bin would show 0.5)."""
    return not fit.exact and fit.tie > MAX_TIE_BOUND
