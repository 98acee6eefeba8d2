"""The privacy accountant of DP updates: zCDP per round, composed over rounds and runs, and
checked against the exact privacy curve of the Gaussian mechanism (Gaussian DP)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy.stats import norm

from radfed.errors import DataError
from radfed.privacy import PolicyRefusal
from radfed.privacy.accountant import PrivacyLedger, epsilon_of, rho_per_round


def _exact_delta(epsilon: float, rounds: int, z: float) -> float:
    """delta(epsilon) of ``rounds`` Gaussian mechanisms with noise z: mu-GDP with
    mu = sqrt(rounds) / z (Dong, Roth and Su 2019, Cor. 2.13 and 3.3)."""
    mu = math.sqrt(rounds) / z
    return float(
        norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)
    )


@pytest.mark.parametrize(("z", "rounds"), [(0.8, 1), (1.0, 10), (2.0, 50), (5.0, 300)])
def test_the_epsilon_reported_holds_for_the_exact_gaussian_mechanism(z: float, rounds: int) -> None:
    delta = 1e-5
    epsilon = epsilon_of(rounds * rho_per_round(z), delta)
    exact = _exact_delta(epsilon, rounds, z)
    # a valid bound: at the reported epsilon the exact delta is within the stated delta ...
    assert exact <= delta
    # ... and not a vacuous one: at half of it, the exact mechanism exceeds delta
    assert _exact_delta(epsilon / 2, rounds, z) > delta


def test_rounds_and_runs_add_up_and_the_budget_refuses_the_round_beyond_it(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy.jsonl")
    rho = rho_per_round(2.0)  # 0.125
    budget = epsilon_of(3 * rho, 1e-5) + 1e-9  # room for exactly three rounds

    for run, round_ in ((1, 1), (1, 2), (2, 1)):
        ledger.spend(rho, run_id=run, server_round=round_, epsilon=budget, delta=1e-5)
    with pytest.raises(PolicyRefusal, match="privacy budget"):
        ledger.spend(rho, run_id=2, server_round=2, epsilon=budget, delta=1e-5)

    spent = ledger.spent()
    assert spent.rounds == 3 and spent.rho == pytest.approx(3 * rho)
    assert spent.epsilon(1e-5) <= budget


def test_without_a_budget_the_ledger_accounts_and_a_broken_one_stops(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy.jsonl")
    for round_ in range(1, 4):
        ledger.spend(0.5, run_id=1, server_round=round_, epsilon=None, delta=1e-5)
    assert ledger.spent().rounds == 3
    (tmp_path / "privacy.jsonl").write_text('{"rho": -1}\n')
    with pytest.raises(DataError, match="privacy ledger"):
        ledger.spent()
    assert rho_per_round(0.0) == math.inf  # clipping without noise: no guarantee


def test_a_ledger_line_without_a_kind_is_an_update_and_an_unknown_kind_is_refused(
    tmp_path: Path,
) -> None:
    # a ledger of radfed before DP statistics: its lines have no kind
    path = tmp_path / "privacy.jsonl"
    path.write_text('{"run": 1, "round": 1, "rho": 0.5}\n')
    ledger = PrivacyLedger(path)
    assert ledger.spent("update").rho == 0.5 and ledger.spent("statistics").rounds == 0
    path.write_text('{"run": 1, "round": 1, "rho": 0.5, "kind": "pixels"}\n')
    with pytest.raises(DataError, match="not radfed's"):
        ledger.spent()
