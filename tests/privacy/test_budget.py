"""The query budget: one training and one evaluation per (run, round), the splits the
policy lets out, the sealed test split once per run at its end; refused requests count."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from radfed.errors import ConfigError, DataError
from radfed.privacy import PolicyRefusal, load_policy
from radfed.privacy.budget import QueryBudget, QueryLedger


def _ask(budget: QueryBudget, ledger: QueryLedger, **request: object) -> bool:
    try:
        settings = {"run_id": 1, "server_round": 1, "kind": "evaluate", "last_round": 9}
        budget.check(ledger, **{**settings, **request})  # type: ignore[arg-type]
    except PolicyRefusal:
        return False
    return True


def test_each_round_of_a_run_is_answered_once_per_kind(tmp_path: Path) -> None:
    ledger, budget = QueryLedger(tmp_path / "queries.jsonl"), QueryBudget()

    answers = [
        _ask(budget, ledger, splits=("val",)),
        _ask(budget, ledger, splits=("val",)),  # the same round again: a sweep
        _ask(budget, ledger, kind="train"),
        _ask(budget, ledger, kind="train"),
        _ask(budget, ledger, server_round=2, splits=("val",)),
        _ask(budget, ledger, run_id=2, splits=("val",)),
    ]

    assert answers == [True, False, True, False, True, True]
    lines = [json.loads(x) for x in (tmp_path / "queries.jsonl").read_text().splitlines()]
    assert [line[3] for line in lines].count("refused") == 2  # refusals are recorded too


def test_the_sealed_test_split_is_evaluated_once_per_run_in_its_last_round(
    tmp_path: Path,
) -> None:
    ledger, budget = QueryLedger(tmp_path / "q.jsonl"), QueryBudget()
    test = {"splits": ("val", "test"), "last_round": 5}

    assert not _ask(budget, ledger, server_round=3, **test)  # not the last round
    assert _ask(budget, ledger, server_round=5, **test)
    assert not _ask(budget, ledger, server_round=5, run_id=1, **test)  # again
    assert _ask(budget, ledger, server_round=5, run_id=2, **test)  # another run
    lax = QueryBudget(test_evaluations=2, test_last_round_only=False)
    assert _ask(lax, ledger, run_id=3, server_round=1, **test)
    assert _ask(lax, ledger, run_id=3, server_round=2, **test)
    assert not _ask(lax, ledger, run_id=3, server_round=3, **test)


def test_splits_the_policy_keeps_at_home_are_refused(tmp_path: Path) -> None:
    ledger = QueryLedger(tmp_path / "q.jsonl")
    budget = QueryBudget(splits=("val",))
    assert not _ask(budget, ledger, splits=("train", "val"))
    assert _ask(budget, ledger, server_round=2, splits=("val",))


def test_a_ledger_that_is_not_radfeds_stops_answers(tmp_path: Path) -> None:
    (tmp_path / "q.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match="query ledger"):
        QueryBudget().check(
            QueryLedger(tmp_path / "q.jsonl"), run_id=1, server_round=1, kind="train"
        )


def _one(path: str) -> bool:
    return _ask(QueryBudget(), QueryLedger(Path(path)), kind="train")


def test_concurrent_requests_for_one_round_are_answered_once(tmp_path: Path) -> None:
    # eight processes ask for the same round at once: the lock lets exactly one through
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        answers = pool.map(_one, [str(tmp_path / "q.jsonl")] * 8)
    assert answers.count(True) == 1


def test_the_queries_table_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "site-policy.toml"
    path.write_text('[policy.queries]\nsplits = ["val"]\ntest-evaluations = 0\n')
    policy = load_policy(path)
    assert policy.queries == QueryBudget(splits=("val",), test_evaluations=0)
    for bad in ('splits = ["holdout"]', "test-evaluations = -1", 'test-last-round-only = "no"'):
        path.write_text(f"[policy.queries]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"policy\.queries"):
            load_policy(path)


def test_no_round_beyond_the_runs_own_and_a_site_wide_cap_on_the_test_split(
    tmp_path: Path,
) -> None:
    ledger, budget = QueryLedger(tmp_path / "q.jsonl"), QueryBudget(test_total=2)
    # a run of 1 round asking for round 2..22: a sweep spread over rounds
    assert _ask(budget, ledger, server_round=1, last_round=1, splits=("val",))
    assert not any(
        _ask(budget, ledger, server_round=r, last_round=1, splits=("val",)) for r in range(2, 23)
    )
    # fresh run ids for the test split: two at most over the site's life
    test = {"splits": ("test",), "server_round": 1, "last_round": 1}
    answers = [_ask(budget, ledger, run_id=run, **test) for run in range(10, 15)]
    assert answers == [True, True, False, False, False]
