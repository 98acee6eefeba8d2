"""Exact Mann-Whitney counts within a site, and the pooled AUC that uses them.

A site's score histograms order its cases only up to a bin, coarser where bins were merged
for the minimum cell size. For a released cell with at least ``k`` positives and ``k``
negatives a site also sends the exact Mann-Whitney count of its own positive-negative pairs
(twice it, so that ties stay integral) and the two sums DeLong's variance needs. They are
held in an ``ExactAuc``, which adds over sites as the histograms do: a pooled cell orders
the pairs within each site exactly and only the pairs across sites by their bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "ExactAuc",
    "check_exact_auc",
    "exact_delong_variance",
    "mann_whitney2",
    "placements2",
    "pooled_auc",
    "tied_pairs",
]


@dataclass(frozen=True)
class ExactAuc:
    """The exact Mann-Whitney parts of the sites (or batches) that sent them; adds over sites.

    ``V10`` of a positive is the share of the negatives scored below it and ``V01`` of a
    negative the share of the positives scored above it, ties counting one half (DeLong's
    placement values, relative to the cases of the part's own site).

    Attributes:
        pairs: the positive-negative pairs the parts cover (``sum P_s N_s``).
        mw2: twice their exact Mann-Whitney count (a pair won counts 2, a tie 1).
        mw2_hist: twice the same pairs' count on each site's own (released) histograms.
        tied: the same pairs that share a bin of their site's histograms.
        v10_sq: ``sum_i V10_i^2`` over the positives.
        v01_sq: ``sum_j V01_j^2`` over the negatives.
    """

    pairs: int = 0
    mw2: int = 0
    mw2_hist: int = 0
    tied: int = 0
    v10_sq: float = 0.0
    v01_sq: float = 0.0

    def __add__(self, other: ExactAuc) -> ExactAuc:
        return ExactAuc(
            pairs=self.pairs + other.pairs,
            mw2=self.mw2 + other.mw2,
            mw2_hist=self.mw2_hist + other.mw2_hist,
            tied=self.tied + other.tied,
            v10_sq=self.v10_sq + other.v10_sq,
            v01_sq=self.v01_sq + other.v01_sq,
        )

    def __bool__(self) -> bool:
        return self.pairs > 0

    def on_histograms(self, pos_hist: tuple[int, ...], neg_hist: tuple[int, ...]) -> ExactAuc:
        """One site's parts, their histogram count and ties taken from the histograms it
        releases (after bins were merged)."""
        return replace(
            self, mw2_hist=mann_whitney2(pos_hist, neg_hist), tied=tied_pairs(pos_hist, neg_hist)
        )


def _ints(hist: tuple[int, ...] | np.ndarray) -> np.ndarray:
    return np.asarray(hist, dtype=np.int64)


def mann_whitney2(
    pos_hist: tuple[int, ...] | np.ndarray, neg_hist: tuple[int, ...] | np.ndarray
) -> int:
    """Twice the Mann-Whitney count of score histograms: a positive in a higher bin than a
    negative counts 2, one in the same bin 1."""
    pos, neg = _ints(pos_hist), _ints(neg_hist)
    below = np.cumsum(neg) - neg
    return int(2 * np.dot(pos, below) + np.dot(pos, neg))


def tied_pairs(
    pos_hist: tuple[int, ...] | np.ndarray, neg_hist: tuple[int, ...] | np.ndarray
) -> int:
    """Positive-negative pairs that share a bin of the histograms."""
    return int(np.dot(_ints(pos_hist), _ints(neg_hist)))


def placements2(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Twice the exact placement counts of the cases (kept at the site).

    Returns:
        ``(a, b)``: per positive (in case order) ``a_i = 2 N V10_i`` (negatives scored below
        it count 2, tied ones 1), shape ``(P,)``; per negative ``b_j = 2 P V01_j``, shape
        ``(N,)``. Both are integers; ``sum(a) == sum(b)`` is twice the Mann-Whitney count.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(labels).reshape(-1).astype(bool)
    pos, neg = scores[positive], scores[~positive]
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    a = np.searchsorted(neg_sorted, pos, "left") + np.searchsorted(neg_sorted, pos, "right")
    below = np.searchsorted(pos_sorted, neg, "left") + np.searchsorted(pos_sorted, neg, "right")
    b = 2 * pos.size - below
    return a.astype(np.int64), b.astype(np.int64)


def pooled_auc(
    pos_hist: tuple[int, ...], neg_hist: tuple[int, ...], exact: ExactAuc
) -> tuple[float, float] | None:
    """The AUC of (pooled) statistics and how far it can be from the exact AUC of the cases.

    The pairs within the sites of ``exact`` count exactly; the others (across sites, and
    within sites that sent no exact count) by the histograms, pairs sharing a bin one half:
    ``2U = mw2(hists) - exact.mw2_hist + exact.mw2``. The bound is half the share of the
    pairs that share a bin and are not covered exactly (0 when every pair is). The bins of
    different sites are merged differently; the bound assumes a pair in different bins is
    ordered by them (a case's merged run is stored in the run's first bin).

    Returns:
        ``(auc, tie_bound)``; None unless both classes are present.
    """
    pos, neg = sum(pos_hist), sum(neg_hist)
    pairs = pos * neg
    if pairs <= 0:
        return None
    if exact.pairs == pairs:
        return exact.mw2 / (2 * pairs), 0.0
    mw2 = mann_whitney2(pos_hist, neg_hist) - exact.mw2_hist + exact.mw2
    tied = tied_pairs(pos_hist, neg_hist) - exact.tied
    return mw2 / (2 * pairs), 0.5 * max(tied, 0) / pairs


def exact_delong_variance(exact: ExactAuc, positives: int, negatives: int) -> float | None:
    """DeLong's variance of the exact AUC of one site's cell from its exact parts.

    With ``A = mw2 / (2 P N)`` the mean of the ``V10`` (and of the ``V01``),
    ``var = s10 / P + s01 / N``, ``s10 = (sum V10^2 - P A^2) / (P - 1)`` and ``s01`` alike:
    DeLong et al. (1988) on the cases, no histogram ties. Pooled cells of several sites
    have no such variance (their placement values mix exact and binned parts).

    Returns:
        None unless ``exact`` covers every pair and there are two cases of each class.
    """
    pairs = positives * negatives
    if pairs <= 0 or exact.pairs != pairs or positives < 2 or negatives < 2:
        return None
    auc = exact.mw2 / (2 * pairs)
    s10 = max(exact.v10_sq - positives * auc * auc, 0.0) / (positives - 1)
    s01 = max(exact.v01_sq - negatives * auc * auc, 0.0) / (negatives - 1)
    return s10 / positives + s01 / negatives


def check_exact_auc(exact: ExactAuc, positives: int, negatives: int) -> None:
    """Raises ValueError unless one site's exact parts can be those of ``positives`` and
    ``negatives`` cases: ``0 <= mw2 <= 2 P N`` and ``P A^2 <= sum V10^2 <= P A`` (the
    ``V10`` lie in [0, 1] and average ``A``), likewise for the ``V01`` (which average ``A``
    too)."""
    if not exact:
        return
    pairs = positives * negatives
    if pairs <= 0 or exact.pairs != pairs:
        raise ValueError("an exact Mann-Whitney count needs positives and negatives")
    if not 0 <= exact.mw2 <= 2 * pairs:
        raise ValueError("the exact Mann-Whitney count exceeds the pairs of the cell")
    auc = exact.mw2 / (2 * pairs)
    for total, cases, key in (
        (exact.v10_sq, positives, "auc-v10-sq"),
        (exact.v01_sq, negatives, "auc-v01-sq"),
    ):
        slack = 1e-9 * max(cases, 1)
        low, high = cases * auc * auc - slack, cases * auc + slack
        if not (math.isfinite(total) and low <= total <= high):
            raise ValueError(f"{key} is outside the range its cell's cases allow")
