"""The record values of binary classification statistics, and their checks at the server.

Keys (under each cell's prefix, ``radfed.federation.schema``): ``tp``, ``fp``, ``tn``,
``fn`` at the threshold; ``pos-hist``, ``neg-hist`` (``score-bins`` counts); and
``noise-variance`` (the variance of each bin's noise under the site's DP statistics, 0 for
exact counts); ``auc-exact`` (0/1), ``auc-mw2`` (twice the exact Mann-Whitney count of the
cell's positive-negative pairs, ties counting 1), ``auc-v10-sq`` and ``auc-v01-sq`` (the
sums of squared placement values, ``radfed.metrics.exact_auc``); ``sens-clusters`` and
``spec-clusters`` (``[patients, sum x^2, sum x m, sum m^2]`` of true positives of the
positives and true negatives of the negatives per patient); ``auc-clusters``
(``[patients, with a positive, with a negative]``) and ``auc-cluster-sums`` (the ten sums of
``radfed.metrics.clusters.AUC_SUMS``). The exact and per-patient values are 0 where not sent
(``BinaryStats.with_min_cell``: too few positives, negatives or patients); DP statistics
send none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from radfed.config import RunConfig
from radfed.metrics.binary import BinaryStats, threshold_bin
from radfed.metrics.clusters import (
    AUC_SUMS,
    AucClusters,
    ProportionClusters,
    check_auc_clusters,
    check_proportion_clusters,
)
from radfed.metrics.exact_auc import ExactAuc, check_exact_auc
from radfed.tasks.protocol import StatsValue, record_count, record_histogram, record_noise

__all__ = ["binary_from_values", "binary_values"]

_COUNT_KEYS = ("tp", "fp", "tn", "fn")


def binary_from_values(values: Mapping[str, object], config: RunConfig) -> BinaryStats:
    """Record values -> binary statistics, checked (ValueError naming the key)."""
    bins = config.score_bins
    noise = record_noise(values.get("noise-variance"), "noise-variance")
    signed = noise > 0  # noisy counts may be negative
    counts = [record_count(values.get(k), k, signed=signed) for k in _COUNT_KEYS]
    pos, neg = (
        record_histogram(values.get(k), k, bins, signed=signed) for k in ("pos-hist", "neg-hist")
    )
    tp, fp, tn, fn = counts
    if sum(pos) != tp + fn or sum(neg) != tn + fp:
        raise ValueError("score histograms disagree with the confusion counts")
    edge = threshold_bin(config.threshold, bins)
    if signed and (edge is None or (sum(pos[edge:]), sum(neg[edge:])) != (tp, fp)):
        raise ValueError("noisy confusion counts must be the sums of the noisy bins")
    stats = BinaryStats(tp, fp, tn, fn, pos, neg, noise=noise, threshold_bin=edge)
    return _with_exact_values(stats, values)


def binary_values(stats: BinaryStats) -> dict[str, StatsValue]:
    """Binary statistics -> record values (the keys of the module docstring)."""
    values: dict[str, StatsValue] = {k: int(getattr(stats, k)) for k in _COUNT_KEYS}
    values["pos-hist"] = [int(v) for v in stats.pos_hist]
    values["neg-hist"] = [int(v) for v in stats.neg_hist]
    values["noise-variance"] = float(stats.noise)
    positives, negatives = stats.tp + stats.fn, stats.tn + stats.fp
    exact = stats.exact if stats.exact.pairs == positives * negatives else ExactAuc()
    values["auc-exact"] = int(bool(exact))
    values["auc-mw2"] = int(exact.mw2)
    values["auc-v10-sq"] = float(exact.v10_sq)
    values["auc-v01-sq"] = float(exact.v01_sq)
    for key, part, cases in (
        ("sens-clusters", stats.sens_clusters, positives),
        ("spec-clusters", stats.spec_clusters, negatives),
    ):
        c = part if part.cases == cases else ProportionClusters()
        values[key] = [int(c.clusters), int(c.xx), int(c.xm), int(c.mm)]
    auc = stats.auc_clusters
    if not exact or (auc.positives, auc.negatives) != (positives, negatives):
        auc = AucClusters()
    values["auc-clusters"] = [int(auc.clusters), int(auc.pos_clusters), int(auc.neg_clusters)]
    values["auc-cluster-sums"] = [float(v) for v in auc.sums]
    return values


def _with_exact_values(stats: BinaryStats, values: Mapping[str, object]) -> BinaryStats:
    """``stats`` with the exact Mann-Whitney parts and the per-patient sums of ``values``,
    checked (ValueError naming the key); noisy statistics carry none."""
    flag = values.get("auc-exact")
    if isinstance(flag, bool) or flag not in (0, 1):
        raise ValueError("auc-exact must be 0 or 1")
    mw2 = record_count(values.get("auc-mw2"), "auc-mw2")
    v10_sq = _record_sum(values.get("auc-v10-sq"), "auc-v10-sq")
    v01_sq = _record_sum(values.get("auc-v01-sq"), "auc-v01-sq")
    sens = _record_counts(values.get("sens-clusters"), "sens-clusters", 4)
    spec = _record_counts(values.get("spec-clusters"), "spec-clusters", 4)
    patients = _record_counts(values.get("auc-clusters"), "auc-clusters", 3)
    sums = values.get("auc-cluster-sums")
    if not isinstance(sums, list) or len(sums) != len(AUC_SUMS):
        raise ValueError(f"auc-cluster-sums must be a list of {len(AUC_SUMS)} numbers")
    auc_sums = tuple(_record_sum(v, "auc-cluster-sums") for v in sums)
    if not flag and (mw2 or v10_sq or v01_sq):
        raise ValueError("auc-mw2 and auc-v10-sq, auc-v01-sq must be 0 without auc-exact")
    if stats.noise > 0:
        if flag or any(sens) or any(spec) or any(patients) or any(auc_sums):
            raise ValueError("noisy statistics carry no exact count and no per-patient sums")
        return stats
    positives, negatives = stats.tp + stats.fn, stats.tn + stats.fp
    exact = ExactAuc()
    if flag:
        exact = ExactAuc(
            pairs=positives * negatives, mw2=mw2, v10_sq=v10_sq, v01_sq=v01_sq
        ).on_histograms(stats.pos_hist, stats.neg_hist)
        check_exact_auc(exact, positives, negatives)
    parts = {}
    for key, (clusters, xx, xm, mm), cases, hits in (
        ("sens-clusters", sens, positives, stats.tp),
        ("spec-clusters", spec, negatives, stats.tn),
    ):
        part = ProportionClusters(clusters, cases if clusters else 0, xx, xm, mm)
        check_proportion_clusters(part, hits, cases, key)
        parts[key] = part
    everyone, with_positives, with_negatives = patients
    covered = everyone > 0
    auc = AucClusters(
        clusters=everyone,
        pos_clusters=with_positives,
        neg_clusters=with_negatives,
        positives=positives if covered else 0,
        negatives=negatives if covered else 0,
        sums=auc_sums,
    )
    check_auc_clusters(auc, positives, negatives, "auc-clusters")
    if covered and not exact:
        raise ValueError("auc-clusters are sent only with auc-exact")
    return dataclasses.replace(
        stats,
        exact=exact,
        sens_clusters=parts["sens-clusters"],
        spec_clusters=parts["spec-clusters"],
        auc_clusters=auc,
    )


def _record_sum(value: object, key: str) -> float:
    """A received sum of squares: a finite number >= 0 (bools refused)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not (math.isfinite(float(value)) and float(value) >= 0):  # type: ignore[arg-type]
        raise ValueError(f"{key} must hold finite numbers >= 0")
    return float(value)  # type: ignore[arg-type]


def _record_counts(value: object, key: str, length: int) -> tuple[int, ...]:
    """A received list of ``length`` non-negative integers."""
    if not isinstance(value, list) or len(value) != length:
        raise ValueError(f"{key} must be a list of {length} counts")
    return tuple(record_count(v, key) for v in value)
