"""Attacks on what statistics schema 3 added to a binary cell: the exact Mann-Whitney count
(``auc-mw2``), the sums of squared placements (``auc-v10-sq``, ``auc-v01-sq``) and the
per-patient sums (``sens-clusters``, ``spec-clusters``, ``auc-clusters``,
``auc-cluster-sums``), together with the histograms and counts that left before.

Every release here is the site's own: ``radfed.site.evaluate.evaluate_cells`` with the
default site policy (k = 10, default subgroups and templates), on a split whose images
carry their score in their first pixel and a model that reads it (a server that chooses
the weights can make a model score cases so; an honest model scores them somehow, and
the attacks below do not depend on how).

Each test is an attack that the release defeats, kept as a regression test: it asserts
what the release guarantees and fails if its defence is removed. Every test runs twice:
with the default policy (no exact pair counts leave) and with ``exact-auc = true`` (they
leave, under the release rules of ``BinaryStats.with_min_cell``). The six attacks that
succeeded against the first version of schema 3 (an attack review) are the first six.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from radfed.config import RunConfig
from radfed.data.loading import SplitData
from radfed.metrics.exact_auc import mann_whitney2
from radfed.privacy import SitePolicy
from radfed.privacy.statistics_dp import StatisticsDP
from radfed.site.evaluate import evaluate_cells
from radfed.tasks.classification import TASK

CONFIG = RunConfig(image_size=16, eval_splits=("val",))
K = 10
WOMAN = {"sex": "F", "age_band": "40-59"}


class ScoreModel(nn.Module):
    """The server's model: a case's score is its image's first pixel."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = images.reshape(images.shape[0], -1)[:, 0].double().clamp(1e-6, 1 - 1e-6)
        return torch.log(p / (1 - p)).float().reshape(-1, 1)


#: Whether the site's policy sends exact pair counts (set per test by ``_exact_auc``).
EXACT_AUC = False


@pytest.fixture(autouse=True, params=[False, True], ids=["default-policy", "exact-auc-on"])
def _exact_auc(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "EXACT_AUC", request.param)


def _release(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    attributes: Sequence[dict[str, str]],
    patients: Sequence[str] = (),
    policy: SitePolicy | None = None,
) -> dict[str, dict[str, Any]]:
    """What leaves the site for one evaluation of the split: per released cell
    (``all=all``, ``sex=F``, ...) its record values; suppressed cells left out."""
    images = torch.zeros(len(labels), 1, 16, 16)
    images[:, 0, 0, 0] = torch.tensor(np.asarray(scores), dtype=torch.float32)
    data = SplitData(
        images=images,
        labels=torch.tensor(np.asarray(labels), dtype=torch.int64),
        attributes=tuple(attributes),
        patients=tuple(patients),
    )
    chosen = dataclasses.replace(policy or SitePolicy.default(), exact_auc=EXACT_AUC)
    _, cells = evaluate_cells(TASK, ScoreModel(), data, CONFIG, K, chosen)
    return {
        f"{c.attribute}={c.group}": TASK.to_values(c.stats) for c in cells if not c.stats.suppressed
    }


def _noisy_scores(labels: np.ndarray, seed: int) -> np.ndarray:
    """An honest model's scores: positives higher on average, overlapping."""
    rng = np.random.default_rng(seed)
    return np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.25, labels.size), 0.01, 0.99)


def _share_below(score: float, others: np.ndarray) -> float:
    return float(np.mean(others < score) + 0.5 * np.mean(others == score))


def test_one_patient_with_a_positive_and_a_negative_image_keeps_its_placements() -> None:
    # Prepare: 60 images of 59 patients; one patient has a positive and a negative image
    # (a follow-up study, or one breast of two), everyone else one image
    labels = np.array([1] * 25 + [0] * 35)
    scores = _noisy_scores(labels, seed=1)
    patients = [f"p{i}" for i in range(60)]
    patients[0] = patients[59] = "mixed"
    pos, neg = scores[labels == 1], scores[labels == 0]
    truth = (_share_below(scores[0], neg), float(np.mean(pos > scores[59])))

    # Execute
    values = _release(scores, labels, [WOMAN] * 60, patients)["all=all"]

    # Assert: I10 + I01 - I patients have both classes; with one, mn = m n of that patient
    # and xn / mn, my / mn are the mean V10 of its positives and V01 of its negatives.
    # The release should not let a combination of its sums describe fewer than k patients.
    everyone, with_pos, with_neg = values["auc-clusters"]
    *_, xn, my, mn = values["auc-cluster-sums"]
    mixed = with_pos + with_neg - everyone
    recovered = (xn / mn, my / mn) if mixed == 1 and mn > 0 else None
    assert recovered != pytest.approx(truth)


def test_the_one_patient_with_two_positive_images_keeps_its_counts_and_placements() -> None:
    # Prepare: one patient has two positive images (both breasts), everyone else one
    labels = np.array([1] * 25 + [0] * 35)
    scores = _noisy_scores(labels, seed=1)
    patients = [f"p{i}" for i in range(60)]
    patients[0] = patients[1] = "two"
    neg = scores[labels == 0]
    detected = int(scores[0] >= 0.5) + int(scores[1] >= 0.5)
    placements = sorted(_share_below(s, neg) for s in scores[:2])

    # Execute
    values = _release(scores, labels, [WOMAN] * 60, patients)["all=all"]

    # Assert: the patient's true positives and each of its two placements should stay
    # at the site
    positives = values["tp"] + values["fn"]
    _, _, xm, mm = values["sens-clusters"]
    extra = mm - positives  # sum m (m - 1): 2 for one patient with two images
    count = xm - values["tp"] if extra == 2 else None
    xx, xm_auc, *_ = values["auc-cluster-sums"]
    auc = values["auc-mw2"] / (2 * positives * (60 - positives))
    total = xm_auc - positives * auc  # sum X (m - 1) = X of that patient
    product = (xx - values["auc-v10-sq"]) / 2  # V_a V_b
    root = np.sqrt(max(total * total - 4 * product, 0.0))
    recovered = sorted([(total - root) / 2, (total + root) / 2]) if extra == 2 else None
    assert count != detected and recovered != pytest.approx(placements)


def test_a_patient_whose_studies_straddle_two_age_bands_is_singled_out() -> None:
    # Prepare: 40 images aged 40-59 and 40 aged 60-79 of 79 patients; one patient had a
    # positive study at 59 and another at 60; the sums leave in all three cells
    labels = np.array(([1] * 15 + [0] * 25) * 2)
    scores = _noisy_scores(labels, seed=2)
    attributes = [{"sex": "F", "age_band": "40-59" if i < 40 else "60-79"} for i in range(80)]
    patients = [f"p{i}" for i in range(80)]
    patients[0] = patients[40] = "aging"
    truth = (int(scores[0] >= 0.5), int(scores[40] >= 0.5))

    # Execute
    cells = _release(scores, labels, attributes, patients)

    # Assert: patients(40-59) + patients(60-79) - patients(all) straddle; with one, the
    # differences of sum m^2, sum x^2 give 2 m_a m_b and 2 x_a x_b of that patient
    young, old, every = (
        np.array(cells[c]["sens-clusters"]) for c in ("age_band=40-59", "age_band=60-79", "all=all")
    )
    straddlers = young[0] + old[0] - every[0]
    cross = every - young - old  # [-straddlers, 2 x_a x_b, x_a m_b + x_b m_a, 2 m_a m_b]
    recovered = None
    if straddlers == 1 and cross[3] == 2:  # one image in each band
        recovered = (1, 1) if cross[1] == 2 else None if cross[2] == 1 else (0, 0)
    assert recovered != truth


def test_the_exact_count_orders_the_positives_inside_a_merged_bin() -> None:
    # Prepare: two positives share the merged bin [0.400, 0.450) with 8 negatives; every
    # other positive lies in bins without negatives
    neg = np.r_[np.linspace(0.10, 0.30, 30), np.linspace(0.4005, 0.4485, 8)]
    pos = np.r_[[0.4123, 0.4377], np.linspace(0.605, 0.945, 30)]
    scores, labels = np.r_[pos, neg], np.r_[np.ones(32, int), np.zeros(38, int)]
    truth = sorted(int(2 * np.sum(neg[30:] < p)) for p in pos[:2])

    # Execute
    values = _release(scores, labels, [WOMAN] * 70)["all=all"]

    # Assert: a positive in a bin without negatives has a known placement; the rest of
    # mw2 and of v10-sq is the sum and the sum of squares of the tied positives' counts
    ph, nh = np.array(values["pos-hist"]), np.array(values["neg-hist"])
    below = 2 * (np.cumsum(nh) - nh)
    alone = (ph > 0) & (nh == 0)
    tied = np.flatnonzero((ph > 0) & (nh > 0))
    recovered = None
    if values["auc-exact"] and tied.size == 1 and ph[tied[0]] == 2:
        base = below[tied[0]]
        total = values["auc-mw2"] - int(np.dot(below[alone], ph[alone])) - 2 * base
        squares = values["auc-v10-sq"] * (2 * nh.sum()) ** 2
        squares -= float(np.dot(below[alone] ** 2, ph[alone])) + 2 * base * total + 2 * base**2
        root = np.sqrt(max(2 * squares - total * total, 0.0))
        recovered = sorted([round((total - root) / 2), round((total + root) / 2)])
    assert recovered != truth


def test_all_minus_a_margin_gives_the_rank_of_the_groups_only_positive() -> None:
    # Prepare: 20 positive and 20 negative women, one positive man among 20 negative men;
    # the model ranks women's positives above every man's negative
    rng = np.random.default_rng(3)
    f_pos, f_neg = rng.uniform(0.6, 0.95, 20), rng.uniform(0.05, 0.45, 20)
    m_pos, m_neg = 0.3137, rng.uniform(0.05, 0.45, 20)
    scores = np.r_[f_pos, f_neg, m_pos, m_neg]
    labels = np.r_[np.ones(20, int), np.zeros(20, int), 1, np.zeros(20, int)]
    attributes = [WOMAN] * 40 + [{"sex": "M", "age_band": "40-59"}] * 21
    truth = int(2 * np.sum(np.r_[f_neg, m_neg] < m_pos))

    # Execute
    cells = _release(scores, labels, attributes)

    # Assert: his merged bin in sex=M holds him and 9 or more negatives; his rank among
    # all 40 negatives should not leave
    every, women, men = cells["all=all"], cells["sex=F"], cells["sex=M"]
    recovered = None
    if every["auc-exact"] and women["auc-exact"] and men["tp"] + men["fn"] == 1:
        cross = mann_whitney2(women["pos-hist"], men["neg-hist"])  # no pair shares a bin
        recovered = every["auc-mw2"] - women["auc-mw2"] - cross
    assert recovered != truth


def _crafted(labels_of_targets: Sequence[int], policy: SitePolicy | None = None) -> tuple[Any, ...]:
    """One evaluation of a crafted model: every image 0.2, the targets' 0.60, 0.65, ...;
    what leaves of ``all``: (the counts and histograms, the exact values)."""
    targets = len(labels_of_targets)
    labels = np.r_[np.ones(20, int), np.zeros(30, int), labels_of_targets]
    scores = np.r_[np.full(50, 0.2), 0.6 + 0.05 * np.arange(targets)]
    values = _release(scores, labels, [WOMAN] * labels.size, policy=policy)["all=all"]
    old = tuple(
        tuple(values[k]) if isinstance(values[k], list) else values[k]
        for k in ("tp", "fp", "tn", "fn", "pos-hist", "neg-hist")
    )
    new = (values["auc-mw2"], round(values["auc-v10-sq"], 9), round(values["auc-v01-sq"], 9))
    return old, new


def test_a_crafted_model_learns_several_labels_from_one_evaluation() -> None:
    # Prepare: four target patients the model recognises (their images scored apart)
    candidates = list(itertools.product((0, 1), repeat=4))

    # Execute: what each of the 16 label assignments would send
    sent = {y: _crafted(y) for y in candidates}

    # Assert: each evaluation should tell the targets apart no better than the counts do
    # (the query budget bounds a crafted-model server by rounds, one look per round)
    by_counts = Counter(old for old, _ in sent.values())
    by_everything = Counter(sent.values())
    singled_out = sum(by_everything[s] == 1 for s in sent.values())
    assert singled_out == sum(by_counts[old] == 1 for old, _ in sent.values())


def test_dp_statistics_give_the_crafted_model_nothing_beyond_noisy_counts() -> None:
    # Prepare: the same crafted model at a site with DP statistics
    policy = dataclasses.replace(SitePolicy.default(), dp_statistics=StatisticsDP(noise=4.0))

    # Execute
    sent = [_crafted(y, policy) for y in ((0, 1, 0, 1), (1, 0, 1, 0))]

    # Assert: no exact count and no square leaves, whichever target is positive
    assert [new for _, new in sent] == [(0, 0.0, 0.0)] * 2


def test_a_cell_with_fewer_than_k_positives_carries_no_exact_count() -> None:
    # Prepare: one positive among 30 negatives; twice its exact count would be its rank
    rng = np.random.default_rng(4)
    neg = rng.uniform(0.05, 0.45, 30)
    scores, labels = np.r_[0.3137, neg], np.r_[1, np.zeros(30, int)]

    # Execute
    values = _release(scores, labels, [WOMAN] * 31)["all=all"]

    # Assert: the cell leaves (31 cases) with its histograms, without its exact count
    assert values["tp"] + values["fn"] == 1
    assert values["auc-exact"] == 0
    assert (values["auc-mw2"], values["auc-v10-sq"], values["auc-v01-sq"]) == (0, 0.0, 0.0)


def test_a_patient_with_more_than_a_kth_of_the_positives_keeps_the_sums_at_the_site() -> None:
    # Prepare: one patient holds 3 of the 20 positive images (more than 1/k); the others
    # one each: sum m^2 - P would be 6 (three images) and sum x m - tp its true positives
    labels = np.array([1] * 20 + [0] * 40)
    scores = _noisy_scores(labels, seed=5)
    patients = [f"p{i}" for i in range(60)]
    patients[0] = patients[1] = patients[2] = "three"

    # Execute
    values = _release(scores, labels, [WOMAN] * 60, patients)["all=all"]

    # Assert: no per-patient sum of the positives or of the AUC leaves; the negatives'
    # (one image per patient) still do
    assert values["sens-clusters"] == [0, 0, 0, 0]
    assert values["auc-clusters"] == [0, 0, 0]
    assert values["auc-cluster-sums"] == [0.0] * 10
    assert values["spec-clusters"][0] == 40
