"""Patient-level (cluster-robust) variances from per-patient sums that add over sites."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from radfed.bias.estimates import design_effect, estimates, interval
from radfed.metrics.binary import BinaryStats
from radfed.metrics.clusters import obuchowski_variance, ratio_variance
from radfed.metrics.exact_auc import exact_delong_variance
from radfed.metrics.intervals import wilson
from radfed.metrics.pooling import pool


def _site(seed: int, patients: int, images: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images of patients with a shared random effect on the score and mixed labels."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(patients), images)
    labels = (rng.random(group.size) < 0.3 + 0.4 * (group % 2)).astype(int)
    latent = 0.8 * labels + rng.normal(0, 1, patients)[group] + rng.normal(0, 0.7, group.size)
    return norm.cdf(latent - 0.4), labels, [f"{seed}-{g}" for g in group]


def _obuchowski_reference(
    scores: np.ndarray, labels: np.ndarray, patients: list[str]
) -> tuple[float, float]:
    """Obuchowski (1997) from the cases, with the placement values compared pairwise."""
    pos, neg = labels == 1, labels == 0
    psi = (scores[pos][:, None] > scores[neg][None, :]) + 0.5 * (
        scores[pos][:, None] == scores[neg][None, :]
    )
    auc = float(psi.mean())
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    keys = sorted(set(patients))
    owner = np.array([keys.index(p) for p in patients])
    x = np.bincount(owner[pos], weights=v10, minlength=len(keys))
    y = np.bincount(owner[neg], weights=v01, minlength=len(keys))
    m = np.bincount(owner[pos], minlength=len(keys))
    n = np.bincount(owner[neg], minlength=len(keys))
    i10, i01, i = int((m > 0).sum()), int((n > 0).sum()), len(keys)
    big_m, big_n = int(pos.sum()), int(neg.sum())
    s10 = i10 / ((i10 - 1) * big_m) * np.sum((x - m * auc) ** 2)
    s01 = i01 / ((i01 - 1) * big_n) * np.sum((y - n * auc) ** 2)
    s11 = i / (i - 1) * np.sum((x - m * auc) * (y - n * auc))
    return auc, float(s10 / big_m + s01 / big_n + 2 * s11 / (big_m * big_n))


def test_obuchowski_variance_from_sums_equals_the_formula_on_the_cases() -> None:
    # Prepare: patients with positives and negatives among their images
    scores, labels, patients = _site(0, 40, 4)
    # Execute
    stats = BinaryStats.from_scores(scores, labels, exact=True, patients=patients)
    auc = stats.exact.mw2 / (2 * stats.exact.pairs)
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    variance = obuchowski_variance(stats.auc_clusters, auc, positives, negatives)
    # Assert
    reference_auc, reference = _obuchowski_reference(scores, labels, patients)
    assert auc == pytest.approx(reference_auc, abs=1e-12)
    assert variance == pytest.approx(reference, rel=1e-9)
    independent = exact_delong_variance(stats.exact, positives, negatives)
    assert independent is not None and variance is not None and variance > 1.2 * independent


def test_one_image_per_patient_gives_the_independent_variances() -> None:
    # Prepare
    scores, labels, _ = _site(1, 150, 1)
    # Execute
    stats = BinaryStats.from_scores(
        scores, labels, exact=True, patients=[str(i) for i in range(150)]
    )
    metrics = estimates(stats.with_min_cell(10))
    # Assert: binomial and DeLong variances, design effect 1, the plain Wilson interval
    tp, positives = stats.tp, stats.tp + stats.fn
    p = tp / positives
    assert ratio_variance(stats.sens_clusters, tp, positives) == pytest.approx(
        p * (1 - p) / (positives - 1), rel=1e-12
    )
    auc = stats.exact.mw2 / (2 * stats.exact.pairs)
    negatives = stats.n - positives
    assert obuchowski_variance(stats.auc_clusters, auc, positives, negatives) == pytest.approx(
        exact_delong_variance(stats.exact, positives, negatives), rel=1e-9
    )
    for name in ("sensitivity", "specificity", "auc"):
        assert design_effect(metrics[name].estimate) == pytest.approx(1.0, abs=1e-9)
    assert interval(metrics["sensitivity"].estimate, 0.95) == wilson(tp, positives)


def test_ratio_variance_matches_statsmodels_cluster_robust_mean() -> None:
    sm = pytest.importorskip("statsmodels.api")
    # Prepare
    scores, labels, patients = _site(2, 60, 3)
    stats = BinaryStats.from_scores(scores, labels, exact=True, patients=patients)
    positive = labels == 1
    hits = (scores[positive] >= 0.5).astype(float)
    groups = np.unique(np.array(patients)[positive], return_inverse=True)[1]
    # Execute: the mean of the hits with a cluster-robust (sandwich) variance
    fit = sm.OLS(hits, np.ones_like(hits)).fit(
        cov_type="cluster", cov_kwds={"groups": groups, "use_correction": False}
    )
    # Assert: ours adds the C / (C - 1) small-sample factor
    c = stats.sens_clusters.clusters
    ours = ratio_variance(stats.sens_clusters, stats.tp, stats.tp + stats.fn)
    assert ours == pytest.approx(c / (c - 1) * float(fit.cov_params()[0, 0]), rel=1e-9)


def test_per_patient_sums_add_over_sites() -> None:
    one, two = _site(3, 30, 2), _site(4, 20, 3)
    parts = [BinaryStats.from_scores(s, y, exact=True, patients=p) for s, y, p in (one, two)]
    together = BinaryStats.from_scores(
        np.concatenate([one[0], two[0]]),
        np.concatenate([one[1], two[1]]),
        exact=True,
        patients=one[2] + two[2],
    )
    pooled = pool(parts, BinaryStats.empty(1000))
    assert pooled.sens_clusters == together.sens_clusters
    assert pooled.spec_clusters == together.spec_clusters


def _clustered_draw(
    rng: np.random.Generator, patients: int, images: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Patients with only positive or only negative images, a patient effect on the score."""
    labels = np.repeat(np.arange(2 * patients) < patients, images).astype(int)
    effect = np.repeat(rng.normal(0, np.sqrt(1.5), 2 * patients), images)
    latent = np.where(labels == 1, _A, _B) + effect + rng.normal(0, 1, labels.size)
    keys = np.repeat(np.arange(2 * patients), images).astype(str).tolist()
    return norm.cdf(latent), labels, keys


#: Latent means of positives and negatives; patient effect variance 1.5, image noise 1.
_A, _B = 0.9, -0.6


def test_patient_level_intervals_cover_where_independent_ones_do_not() -> None:
    # Prepare: 60 positive and 60 negative patients with 4 images each, 1000 draws
    rng = np.random.default_rng(11)
    true_sensitivity = float(norm.cdf(_A / np.sqrt(2.5)))  # P(latent >= 0), threshold 0.5
    true_auc = float(norm.cdf((_A - _B) / np.sqrt(5.0)))
    covered = {"sens": 0, "sens-indep": 0, "auc": 0, "auc-indep": 0}
    reps = 1000
    # Execute
    for _ in range(reps):
        scores, labels, keys = _clustered_draw(rng, 60, 4)
        stats = BinaryStats.from_scores(scores, labels, exact=True, patients=keys)
        metrics = estimates(stats.with_min_cell(10))
        sens = interval(metrics["sensitivity"].estimate, 0.95)
        plain = wilson(stats.tp, stats.tp + stats.fn)
        auc = interval(metrics["auc"].estimate, 0.95)
        independent = BinaryStats.from_scores(scores, labels, exact=True)  # no patients
        auc_plain = interval(estimates(independent)["auc"].estimate, 0.95)
        for name, fit, truth in (
            ("sens", sens, true_sensitivity),
            ("sens-indep", plain, true_sensitivity),
            ("auc", auc, true_auc),
            ("auc-indep", auc_plain, true_auc),
        ):
            assert fit.low is not None and fit.high is not None
            covered[name] += fit.low <= truth <= fit.high
    # Assert
    share = {name: count / reps for name, count in covered.items()}
    assert share["sens"] >= 0.93 and share["auc"] >= 0.93, share
    assert share["sens-indep"] < 0.90 and share["auc-indep"] < 0.90, share
