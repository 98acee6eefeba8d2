"""What `radfed site audit` points out: a log of a plain run has nothing to look at; a
planted double evaluation, other weights evaluated, the sealed test split and a refused
bundle are each named with their run and round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from radfed.federation.codes import ErrorCode
from radfed.privacy import AuditLog, Request, read_entries, verify
from radfed.privacy.audit import GENESIS, AuditEntry, AuditKind
from radfed.site.review import review

RUN_CONFIG = {"task": "classification", "eval-splits": "train,val"}


def _weights(round_: int) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 2), float(round_), dtype=np.float32))})


def _reply() -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": 20})})


def _ask(log: AuditLog, kind: str, round_: int, weights: int, **settings: object) -> None:
    request = Request.describe(
        kind,
        {**RUN_CONFIG, **settings},
        arrays=_weights(weights),
        message_config={"server-round": round_},
    )
    handler = kind.partition(".")[0]  # the handler that answered: train, evaluate
    log.record(_reply(), run_id=7, server_round=round_, kind=handler, request=request)


def _plain_run(log: AuditLog, rounds: int = 2) -> None:
    """Survey, then per round: train from the last global model, evaluate the new one."""
    _ask(log, "evaluate", 0, 0)
    for r in range(1, rounds + 1):
        _ask(log, "train", r, r - 1)
        _ask(log, "evaluate", r, r)


def test_a_plain_run_has_nothing_to_look_at(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    _plain_run(log)

    assert review(read_entries(log.path)) == []


def test_a_double_evaluation_and_other_weights_are_pointed_out(tmp_path: Path) -> None:
    # Prepare: round 1 is evaluated twice, the second time with a crafted model
    log = AuditLog(tmp_path / "audit.jsonl")
    _ask(log, "evaluate", 0, 0)
    _ask(log, "train", 1, 0)
    _ask(log, "evaluate", 1, 1)
    _ask(log, "evaluate", 1, 99)
    _ask(log, "train", 2, 1)

    # Execute
    findings = review(read_entries(log.path))

    # Assert
    assert [(f.kind, f.run, f.server_round) for f in findings] == [
        ("repeated evaluation", 7, 1),
        ("evaluated other weights", 7, 1),
    ]
    assert "evaluated 2 times" in findings[0].line()


def test_message_types_with_their_action_are_judged_like_the_plain_ones(tmp_path: Path) -> None:
    # Prepare: the same double evaluation of the test split, sent as `evaluate.default`
    # (Flower routes it to the evaluate handler) and trained as `train.default`
    log = AuditLog(tmp_path / "audit.jsonl")
    _ask(log, "train.default", 1, 0)
    _ask(log, "evaluate.default", 1, 1, **{"eval-splits": "test"})
    _ask(log, "evaluate.default", 1, 99)
    _ask(log, "train.default", 2, 1)

    # Execute
    findings = review(read_entries(log.path))

    # Assert: named as a plain `evaluate` would be; the audit log keeps the type as sent
    assert [f.kind for f in findings] == [
        "sealed test split",
        "repeated evaluation",
        "evaluated other weights",
    ]
    kinds = [e.request.kind for e in read_entries(log.path) if e.request is not None]
    assert kinds[1] == "evaluate.default"


def test_the_sealed_test_split_and_a_refused_bundle_are_pointed_out(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    _ask(log, "evaluate", 3, 3, **{"eval-splits": "val,test"})
    refused = Request.describe("train", RUN_CONFIG, bundle_sha256="ab" * 32)
    log.record(
        None, run_id=8, server_round=1, kind="error", error_code=ErrorCode.BUNDLE, request=refused
    )

    findings = review(read_entries(log.path))

    assert [(f.kind, f.run, f.server_round) for f in findings] == [
        ("sealed test split", 7, 3),
        ("refused bundle", 8, 1),
    ]


def test_site_audit_exits_1_and_names_what_to_look_at(tmp_path: Path) -> None:
    # Prepare: a site whose log holds a planted double evaluation
    site = tmp_path / "site"
    (site / ".radfed").mkdir(parents=True)
    log = AuditLog.for_site(site)
    _plain_run(log)
    _ask(log, "evaluate", 2, 2)

    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "radfed", "site", "audit", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert
    assert done.returncode == 1, done.stderr
    assert "audit log intact: 6 entries" in done.stdout
    assert "look at: run 7 round 2: repeated evaluation: evaluated 2 times" in done.stdout
    assert "asked evaluate train,val weights" in done.stdout
    assert verify(log.path) == 6


def test_lines_of_the_first_format_still_verify_and_the_chain_goes_on(tmp_path: Path) -> None:
    # Prepare: a log radfed 0.1 wrote (no v, request or released)
    old = AuditEntry(
        seq=1,
        time="2026-01-01T00:00:00.000+00:00",
        run_id=1,
        server_round=1,
        kind=AuditKind.QUERY,
        nbytes=10,
        sha256="0" * 64,
        error_code=None,
        records={},
        prev=GENESIS,
        version=1,
    )
    path = tmp_path / "audit.jsonl"
    path.write_bytes(old.line() + b"\n")
    assert "request" not in json.loads(path.read_text())

    # Execute: this radfed appends to it
    _ask(AuditLog(path), "evaluate", 2, 2)

    # Assert
    assert verify(path) == 2
    entries = read_entries(path)
    assert entries[0].request is None and entries[1].request is not None
