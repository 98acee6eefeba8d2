"""DP statistics: the noisy release of one cell, its cost, its policy section and what a
run must be for the site to release with noise."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from radfed.config import RunConfig, TaskName
from radfed.errors import ConfigError
from radfed.metrics.binary import BinaryStats
from radfed.privacy import PolicyRefusal, load_policy
from radfed.privacy.accountant import PrivacyLedger, epsilon_of
from radfed.privacy.statistics_dp import StatisticsDP, bounded_cases, noisy_release


def _exact(seed: int = 0, n: int = 200, bins: int = 20) -> BinaryStats:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    return BinaryStats.from_scores(scores, labels, threshold=0.5, bins=bins)


def test_a_noisy_release_sums_its_confusion_counts_from_the_noisy_bins() -> None:
    # Prepare
    exact = _exact()

    # Execute
    released = noisy_release(exact, 3.0, random.Random(1))

    # Assert: noise on every bin, counts derived from the bins at the threshold (bin 10),
    # the variance stated, the exact values gone
    assert released.noise == 9.0 and released.threshold_bin == 10
    assert released.tp == sum(released.pos_hist[10:]) and released.fn == sum(released.pos_hist[:10])
    assert released.fp == sum(released.neg_hist[10:]) and released.tn == sum(released.neg_hist[:10])
    assert released.pos_hist != exact.pos_hist and released.neg_hist != exact.neg_hist


def test_noisy_releases_are_unbiased_with_the_stated_variance() -> None:
    # Prepare
    exact, rng = _exact(), random.Random(2)

    # Execute
    draws = [noisy_release(exact, 2.0, rng) for _ in range(2000)]

    # Assert: mean tp is the exact tp; its variance is that of 10 bins of sigma^2 = 4
    tps = np.array([d.tp for d in draws], dtype=float)
    assert abs(tps.mean() - exact.tp) < 4 * np.sqrt(40 / 2000)
    assert tps.var() == pytest.approx(draws[0].count_noise()[0], rel=0.1)


def test_noise_goes_on_exact_unmerged_statistics_only() -> None:
    exact = _exact()
    with pytest.raises(ValueError, match="threshold on an edge"):
        noisy_release(
            BinaryStats.from_scores(np.array([0.3]), np.array([1]), threshold=0.55, bins=10), 1.0
        )
    with pytest.raises(ValueError):
        noisy_release(noisy_release(exact, 1.0), 1.0)


def test_one_release_costs_the_gaussian_mechanism_of_its_sensitivity() -> None:
    # L cases per patient in A cells each: sensitivity L sqrt(A), rho = L^2 A / (2 sigma^2)
    policy = StatisticsDP(noise=4.0, cases_per_patient=2)
    assert policy.rho(5) == pytest.approx(4 * 5 / 32)
    assert policy.epsilon_of_release(5) == pytest.approx(epsilon_of(4 * 5 / 32, 1e-6))


def test_the_statistics_budget_refuses_the_release_beyond_it(tmp_path: Path) -> None:
    # Prepare: a budget with room for exactly three releases of 5 cells per case
    policy = StatisticsDP(noise=4.0, delta=1e-6)
    policy = StatisticsDP(noise=4.0, delta=1e-6, epsilon=epsilon_of(3 * policy.rho(5), 1e-6) + 1e-9)
    ledger = PrivacyLedger(tmp_path / "privacy.jsonl")
    ledger.spend(10.0, run_id=1, server_round=1, epsilon=None, delta=1e-5)  # an update

    # Execute
    for round_ in (1, 2, 3):
        policy.spend(ledger, 5, run_id=1, server_round=round_)
    with pytest.raises(PolicyRefusal, match=r"dp-statistics\] epsilon"):
        policy.spend(ledger, 5, run_id=2, server_round=1)

    # Assert: each kind is its own budget; the refused release is not recorded
    assert ledger.spent("statistics").rounds == 3
    assert ledger.spent("update").rounds == 1 and ledger.spent().rounds == 4


def test_a_patient_counts_at_most_cases_per_patient_cases() -> None:
    assert bounded_cases(["a", "b", "a", "a", "c", "b"], 6, 1) == [0, 1, 4]
    assert bounded_cases(["a", "b", "a", "a", "c", "b"], 6, 2) == [0, 1, 2, 4, 5]
    assert bounded_cases([], 3, 1) == [0, 1, 2]


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        ({"task": TaskName.SEGMENTATION}, "binary classification only"),
        ({"num_classes": 3}, "binary classification only"),
    ],
)
def test_a_run_the_site_cannot_release_with_noise_is_refused(
    settings: dict[str, object], refusal: str
) -> None:
    config = RunConfig(**{"score_bins": 20, **settings})  # type: ignore[arg-type]
    with pytest.raises(PolicyRefusal, match=refusal):
        StatisticsDP(noise=2.0).check_run(config)


def test_the_policy_section_is_read_with_its_defaults(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "site-policy.toml"
    path.write_text("[policy.dp-statistics]\nnoise = 4.0\nepsilon = 10\n")

    # Execute
    policy = load_policy(path)

    # Assert: noise and budget as set; delta and cases per patient by default; the score
    # bins a run may use default to 20 (fine bins add noise to every confusion count)
    assert policy.dp_statistics == StatisticsDP(noise=4.0, epsilon=10.0)
    assert policy.templates is not None and policy.templates.score_bins == (20,)
    assert policy.describe()["dp-statistics"]["noise"] == 4.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[policy.dp-statistics]\nepsilon = 1.0\n", "noise' is missing"),
        ("[policy.dp-statistics]\nnoise = 0\n", "noise' must be a finite number > 0"),
        ("[policy.dp-statistics]\nnoise = 2\ndelta = 1.5\n", "delta' must be a number in"),
        ("[policy.dp-statistics]\nnoise = 2\ncases-per-patient = 0\n", "an integer >= 1"),
        (
            "[policy.dp-statistics]\nnoise = 2\nsigma = 2\n",
            "unknown key 'policy.dp-statistics.sigma'",
        ),
        (
            "[policy.dp-statistics]\nnoise = 2\n[policy.templates]\nthresholds = [0.53]\n",
            "not a multiple of 1/20",
        ),
    ],
)
def test_a_bad_dp_statistics_section_is_refused_by_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "site-policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_policy(path)
