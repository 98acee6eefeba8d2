"""Sums over patients for cluster-robust (patient-level) variances, and those variances.

A site may hold several images of a patient, whose outcomes are correlated: intervals that
take the images as independent are then too narrow. For each released binary cell a site
sends, per proportion (sensitivity, specificity) and for the AUC, second-moment sums over
its patients; never a patient's own values or key. Patients are disjoint across sites, so
the sums of several sites add (``+``) and the pooled sums are those of the pooled patients.
A site with one image per patient sends sums whose variances equal the independent ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "AUC_SUMS",
    "AucClusters",
    "ProportionClusters",
    "auc_clusters",
    "auc_design_effect",
    "check_auc_clusters",
    "check_proportion_clusters",
    "obuchowski_variance",
    "patient_groups",
    "proportion_clusters",
    "proportion_design_effect",
    "ratio_variance",
]


@dataclass(frozen=True)
class ProportionClusters:
    """Sums over the patients of a cell for a proportion ``X / M`` of its images.

    For patient ``p`` with ``m_p`` of the ``M`` images (sensitivity: positives;
    specificity: negatives) of which ``x_p`` are successes (true positives; true negatives).
    All zero when the site sent none.

    Attributes:
        clusters: patients with ``m_p > 0``.
        cases: the images the sums cover (``M`` when sent).
        xx, xm, mm: ``sum x_p^2``, ``sum x_p m_p``, ``sum m_p^2``.
        largest: the largest ``m_p`` (at the site, for its release rule; not sent).
    """

    clusters: int = 0
    cases: int = 0
    xx: int = 0
    xm: int = 0
    mm: int = 0
    largest: int = field(default=0, compare=False)

    def __add__(self, other: ProportionClusters) -> ProportionClusters:
        return ProportionClusters(
            self.clusters + other.clusters,
            self.cases + other.cases,
            self.xx + other.xx,
            self.xm + other.xm,
            self.mm + other.mm,
            max(self.largest, other.largest),
        )

    def releasable(self, k: int) -> bool:
        """Whether a site may send the sums under minimum cell size ``k``: no patient holds
        more than ``1 / k`` of the images (so at least ``k`` patients share them, and no
        patient's own counts dominate the second moments)."""
        return self.clusters > 0 and self.largest * k <= self.cases


#: The order of ``AucClusters.sums``: with ``X_p``, ``Y_p`` the sums of the ``V10`` of the
#: patient's positives and of the ``V01`` of its negatives, ``m_p``, ``n_p`` their numbers,
#: ``sum X^2, X m, m^2, Y^2, Y n, n^2, X Y, X n, m Y, m n``.
AUC_SUMS = ("xx", "xm", "mm", "yy", "yn", "nn", "xy", "xn", "my", "mn")


@dataclass(frozen=True)
class AucClusters:
    """Sums over the patients of a cell for Obuchowski's clustered AUC variance.

    The placement values are those of the site's own cases (as ``ExactAuc``), so the sums
    serve the AUC of a cell of one site; all zero when the site sent none.

    Attributes:
        clusters: patients with an image in the cell (``I``).
        pos_clusters, neg_clusters: patients with a positive (``I10``), with a negative
            (``I01``).
        positives, negatives: the images the sums cover.
        sums: the ten sums of ``AUC_SUMS``.
        largest: the most positives and the most negatives of one patient (at the site,
            for its release rule; not sent).
    """

    clusters: int = 0
    pos_clusters: int = 0
    neg_clusters: int = 0
    positives: int = 0
    negatives: int = 0
    sums: tuple[float, ...] = (0.0,) * len(AUC_SUMS)
    largest: tuple[int, int] = field(default=(0, 0), compare=False)

    def __add__(self, other: AucClusters) -> AucClusters:
        return AucClusters(
            self.clusters + other.clusters,
            self.pos_clusters + other.pos_clusters,
            self.neg_clusters + other.neg_clusters,
            self.positives + other.positives,
            self.negatives + other.negatives,
            tuple(a + b for a, b in zip(self.sums, other.sums, strict=True)),
            (max(self.largest[0], other.largest[0]), max(self.largest[1], other.largest[1])),
        )

    def releasable(self, k: int) -> bool:
        """Whether a site may send the sums under minimum cell size ``k``: no patient holds
        more than ``1 / k`` of the positives or of the negatives."""
        most_pos, most_neg = self.largest
        return (
            self.clusters > 0 and most_pos * k <= self.positives and most_neg * k <= self.negatives
        )


def patient_groups(patients: tuple[str, ...] | list[str], count: int) -> np.ndarray:
    """Each case's patient number, shape ``(count,)``; without patient keys every case is
    its own patient (as ``radfed.privacy.statistics_dp.bounded_cases``)."""
    if not patients:
        return np.arange(count, dtype=np.int64)
    if len(patients) != count:
        msg = f"patient keys and cases differ in length: {len(patients)} vs {count}"
        raise ValueError(msg)
    _, inverse = np.unique(np.asarray(patients, dtype=object).astype(str), return_inverse=True)
    return inverse.astype(np.int64).reshape(-1)


def proportion_clusters(hits: np.ndarray, group: np.ndarray) -> ProportionClusters:
    """The sums of a proportion over the images of its denominator (kept at the site).

    Args:
        hits: per image whether it is a success, shape ``(M,)``.
        group: per image its patient number, shape ``(M,)``.
    """
    if group.size == 0:
        return ProportionClusters()
    _, local = np.unique(group, return_inverse=True)
    m = np.bincount(local)
    x = np.bincount(local[np.asarray(hits, dtype=bool)], minlength=m.size)
    return ProportionClusters(
        clusters=int(m.size),
        cases=int(m.sum()),
        xx=int(x @ x),
        xm=int(x @ m),
        mm=int(m @ m),
        largest=int(m.max()),
    )


def auc_clusters(
    v10: np.ndarray, pos_group: np.ndarray, v01: np.ndarray, neg_group: np.ndarray
) -> AucClusters:
    """Obuchowski's sums of a cell (kept at the site).

    Args:
        v10: per positive its ``V10``, shape ``(P,)``; ``pos_group`` its patient number.
        v01: per negative its ``V01``, shape ``(N,)``; ``neg_group`` its patient number.
    """
    _, local = np.unique(np.concatenate([pos_group, neg_group]), return_inverse=True)
    local = local.reshape(-1)
    size = int(local.max()) + 1 if local.size else 0
    pos_local, neg_local = local[: pos_group.size], local[pos_group.size :]
    x = np.bincount(pos_local, weights=v10, minlength=size)
    m = np.bincount(pos_local, minlength=size).astype(np.float64)
    y = np.bincount(neg_local, weights=v01, minlength=size)
    n = np.bincount(neg_local, minlength=size).astype(np.float64)
    pairs = {"x": x, "m": m, "y": y, "n": n}
    sums = tuple(float(pairs[name[0]] @ pairs[name[1]]) for name in AUC_SUMS)
    return AucClusters(
        clusters=size,
        pos_clusters=int(np.count_nonzero(m)),
        neg_clusters=int(np.count_nonzero(n)),
        positives=int(pos_group.size),
        negatives=int(neg_group.size),
        sums=sums,
        largest=(int(m.max(initial=0)), int(n.max(initial=0))),
    )


def ratio_variance(c: ProportionClusters, successes: int, trials: int) -> float | None:
    """Cluster-robust variance of ``p = X / M`` (ratio estimator, patients as clusters).

    ``C / (C - 1) * sum_p (x_p - p m_p)^2 / M^2 = C / (C - 1) * (Sxx - 2 p Sxm + p^2 Smm)
    / M^2``, the linearisation (sandwich) variance of survey sampling with patients as
    primary units; with one image per patient it is ``p (1 - p) / (M - 1)``. Reference:
    W. G. Cochran (1977), Sampling Techniques, 3rd ed., section 6.9; S. L. Lohr (2010),
    Sampling: Design and Analysis, 2nd ed., section 9.1.

    Returns:
        None unless the sums cover the ``trials`` and come from at least two patients.
    """
    if trials <= 0 or c.cases != trials or c.clusters < 2:
        return None
    p = successes / trials
    spread = c.xx - 2 * p * c.xm + p * p * c.mm
    return c.clusters / (c.clusters - 1) * max(spread, 0.0) / trials**2


def proportion_design_effect(c: ProportionClusters, successes: int, trials: int) -> float | None:
    """The design effect of ``p = X / M``: ``ratio_variance`` over the same variance with
    every image its own patient, ``p (1 - p) / (M - 1)`` (so exactly 1 with one image per
    patient); None where either is undefined or ``p`` is 0 or 1."""
    variance = ratio_variance(c, successes, trials)
    if variance is None or trials < 2 or successes in (0, trials):
        return None
    p = successes / trials
    return variance / (p * (1 - p) / (trials - 1))


def obuchowski_variance(c: AucClusters, auc: float, positives: int, negatives: int) -> float | None:
    """Obuchowski's nonparametric variance of the AUC of clustered images.

    With ``I``, ``I10``, ``I01`` the patients with an image, a positive, a negative:
    ``S10 = I10 / ((I10 - 1) P) sum (X_p - m_p A)^2``, ``S01 = I01 / ((I01 - 1) N)
    sum (Y_p - n_p A)^2``, ``S11 = I / (I - 1) sum (X_p - m_p A)(Y_p - n_p A)`` and
    ``var = S10 / P + S01 / N + 2 S11 / (P N)``; each square expanded over the sent sums.
    With one image per patient it is DeLong's variance. Reference: N. A. Obuchowski (1997),
    Nonparametric analysis of clustered ROC curve data, Biometrics 53:567-578.

    Returns:
        None unless the sums cover the cell's images and come from at least two patients
        with positives and two with negatives, or when the sums give a negative variance.
    """
    if positives != c.positives or negatives != c.negatives or positives < 1 or negatives < 1:
        return None
    if c.pos_clusters < 2 or c.neg_clusters < 2 or c.clusters < 2:
        return None
    xx, xm, mm, yy, yn, nn, xy, xn, my, mn = c.sums
    a = auc
    rx = xx - 2 * a * xm + a * a * mm
    ry = yy - 2 * a * yn + a * a * nn
    rxy = xy - a * xn - a * my + a * a * mn
    s10 = c.pos_clusters / ((c.pos_clusters - 1) * positives) * max(rx, 0.0)
    s01 = c.neg_clusters / ((c.neg_clusters - 1) * negatives) * max(ry, 0.0)
    s11 = c.clusters / (c.clusters - 1) * rxy
    variance = s10 / positives + s01 / negatives + 2 * s11 / (positives * negatives)
    return variance if variance >= 0 else None


def auc_design_effect(clustered: float | None, independent: float | None) -> float | None:
    """Obuchowski's variance over DeLong's of the same cases; None where either is
    undefined or DeLong's is 0."""
    if clustered is None or independent is None or independent <= 0:
        return None
    return clustered / independent


def check_proportion_clusters(c: ProportionClusters, successes: int, trials: int, key: str) -> None:
    """Raises ValueError (naming ``key``) unless the sums can be those of ``successes`` of
    ``trials`` images over ``c.clusters`` patients."""
    values = (c.clusters, c.cases, c.xx, c.xm, c.mm)
    if any(v < 0 for v in values):
        raise ValueError(f"{key} must hold non-negative integers")
    if c.clusters == 0:
        if any(values):
            raise ValueError(f"{key} holds sums without patients")
        return
    m, x = trials, successes
    if c.cases != m or not 1 <= c.clusters <= m:
        raise ValueError(f"{key} counts more patients than images")
    ok = (
        m <= c.mm <= m * m
        and c.mm * c.clusters >= m * m  # sum m_p^2 >= M^2 / C
        and x <= c.xx <= c.xm <= c.mm  # 1 <= x_p <= m_p where x_p > 0
        and c.xx <= x * x
        and c.xm <= x * m
        and c.xm * c.xm <= c.xx * c.mm  # Cauchy-Schwarz
    )
    if not ok:
        raise ValueError(f"{key} holds sums its cell's images cannot have")


def check_auc_clusters(c: AucClusters, positives: int, negatives: int, key: str) -> None:
    """Raises ValueError (naming ``key``) unless the sums can be Obuchowski's sums of
    ``positives`` and ``negatives`` images (the placements lie in [0, 1])."""
    counts = (c.clusters, c.pos_clusters, c.neg_clusters)
    if any(v < 0 for v in counts) or any(not (math.isfinite(v) and v >= 0) for v in c.sums):
        raise ValueError(f"{key} must hold finite non-negative values")
    if c.clusters == 0:
        if any(counts) or any(c.sums) or c.positives or c.negatives:
            raise ValueError(f"{key} holds sums without patients")
        return
    p, n = positives, negatives
    if (c.positives, c.negatives) != (p, n):
        raise ValueError(f"{key} covers other images than its cell's")
    if not (
        1 <= c.pos_clusters <= p
        and 1 <= c.neg_clusters <= n
        and max(c.pos_clusters, c.neg_clusters) <= c.clusters
        and c.clusters <= c.pos_clusters + c.neg_clusters
    ):
        raise ValueError(f"{key} counts more patients than images")
    xx, xm, mm, yy, yn, nn, xy, xn, my, mn = c.sums
    slack = 1e-9 * (p + n) ** 2
    within = (
        xx <= xm + slack
        and xm <= mm + slack
        and yy <= yn + slack
        and yn <= nn + slack
        and p - slack <= mm <= p * p + slack
        and n - slack <= nn <= n * n + slack
        and xy <= mn + slack
        and xn <= mn + slack
        and my <= mn + slack
        and mn <= p * n + slack
    )
    if not within:
        raise ValueError(f"{key} holds sums its cell's images cannot have")
