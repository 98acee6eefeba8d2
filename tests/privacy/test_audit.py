"""The audit log: what left is named (never its values), sized as serialized, and chained."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import stat
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from torch import nn

from radfed.errors import DataError
from radfed.privacy.audit import (
    GENESIS,
    AuditKind,
    AuditLog,
    _last_line,
    read_entries,
    verify,
)

SECRET_METRIC = 0.123456
SECRET_CONFIG = "St-Elsewhere-Radiology-7"


def _content() -> RecordDict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    return RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": 17, "train-loss": SECRET_METRIC}),
            "site": ConfigRecord({"name": SECRET_CONFIG, "schema-version": 1}),
        }
    )


def _log(tmp_path: Path) -> AuditLog:
    (tmp_path / "site").mkdir()
    return AuditLog.for_site(tmp_path / "site")


def _fill(log: AuditLog, rounds: int = 4) -> None:
    for r in range(1, rounds + 1):
        log.record(_content(), run_id=7, server_round=r, kind="train")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_entry_names_what_left_with_the_released_values_but_never_weights(
    tmp_path: Path,
) -> None:
    # Prepare
    log = _log(tmp_path)
    content = _content()

    # Execute
    entry = log.record(content, run_id=7, server_round=2, kind="train")

    # Assert: the file is where the site keeps its state, and holds one entry
    assert log.path == tmp_path / "site" / ".radfed" / "audit.jsonl"
    text = log.path.read_text()
    (line,) = text.splitlines()
    obj = json.loads(line)
    assert (obj["run"], obj["round"], obj["kind"], obj["seq"]) == (7, 2, "train", 1)
    assert obj["prev"] == GENESIS
    assert datetime.fromisoformat(obj["time"]).utcoffset() == timedelta(0)
    arrays = {a["name"]: a for a in obj["records"]["arrays"]["arrays"]}
    assert arrays["0.weight"] == {"name": "0.weight", "shape": [2, 3], "dtype": "float32"}
    assert arrays["1.num_batches_tracked"]["dtype"] == "int64"
    assert arrays["1.num_batches_tracked"]["shape"] == []
    assert obj["records"]["metrics"] == {"type": "metric", "keys": ["num-examples", "train-loss"]}
    assert obj["records"]["site"] == {"type": "config", "keys": ["name", "schema-version"]}
    # the statistics that left are the site's to see; the weights are named and hashed only
    assert obj["released"]["metrics"] == {"num-examples": 17, "train-loss": SECRET_METRIC}
    assert obj["released"]["site"]["name"] == SECRET_CONFIG
    assert "arrays" not in obj["released"]
    weight = float(_content()["arrays"]["0.weight"].numpy()[0, 0])  # type: ignore[index]
    assert repr(weight)[:8] not in text
    assert str(tmp_path) not in text
    assert read_entries(log.path) == [entry]


def test_size_and_hash_are_those_of_the_serialized_content(tmp_path: Path) -> None:
    # Prepare
    content = _content()
    serialized = recorddict_to_proto(content).SerializeToString(deterministic=True)

    # Execute
    entry = _log(tmp_path).record(content, run_id=1, server_round=1, kind="evaluate")

    # Assert
    assert entry.nbytes == len(serialized)
    assert entry.sha256 == hashlib.sha256(serialized).hexdigest()
    weights = sum(
        t.numel() * t.element_size() for t in nn.Sequential(nn.Linear(3, 2)).state_dict().values()
    )
    assert entry.nbytes > weights


def test_error_reply_is_recorded_without_content(tmp_path: Path) -> None:
    log = _log(tmp_path)
    entry = log.record(None, run_id=3, server_round=1, kind="error", error_code=3002)
    assert (entry.kind, entry.error_code, entry.nbytes, entry.sha256) == (
        AuditKind.ERROR,
        3002,
        0,
        None,
    )
    assert entry.records == {}
    assert verify(log.path) == 1


def test_unknown_kind_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    log = _log(tmp_path)
    with pytest.raises(ValueError, match="upload"):
        log.record(_content(), run_id=1, server_round=1, kind="upload")
    assert not log.path.exists()


def test_file_is_private_to_the_site_user(tmp_path: Path) -> None:
    # Execute
    log = _log(tmp_path)
    log.record(_content(), run_id=1, server_round=1, kind="train")

    # Assert
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.path.parent.stat().st_mode) == 0o700


def test_appending_from_new_instances_keeps_the_chain(tmp_path: Path) -> None:
    # Prepare
    path = _log(tmp_path).path

    # Execute: each message is a fresh ClientApp process, with its own AuditLog
    AuditLog(path).record(_content(), run_id=1, server_round=1, kind="train")
    AuditLog(path).record(_content(), run_id=1, server_round=1, kind="evaluate")
    AuditLog(path).record(None, run_id=1, server_round=2, kind="error", error_code=3099)

    # Assert
    assert verify(path) == 3
    entries = read_entries(path)
    assert [e.seq for e in entries] == [1, 2, 3]
    lines = _lines(path)
    assert entries[2].prev == hashlib.sha256(lines[1].encode()).hexdigest()


def test_long_lines_chain_across_read_blocks(tmp_path: Path) -> None:
    # Prepare: a model with many arrays makes lines longer than the tail-read block
    many = {f"layer{i}.weight": Array(np.zeros(2, np.float32)) for i in range(2000)}
    log = _log(tmp_path)

    # Execute
    for r in range(3):
        log.record(
            RecordDict({"arrays": ArrayRecord(many)}), run_id=1, server_round=r, kind="train"
        )

    # Assert
    assert len(_lines(log.path)[0]) > 1 << 16
    assert verify(log.path) == 3


@pytest.mark.parametrize(
    ("tamper", "line", "why"),
    [
        (lambda ls: [ls[0], ls[1].replace('"round":2', '"round":9'), *ls[2:]], 2, "edited"),
        (lambda ls: [*ls[:3], ls[3].replace('"kind":"train"', '"kind":"evaluate"')], 4, "edited"),
        (lambda ls: [ls[0], ls[1] + " ", *ls[2:]], 2, "edited"),
        (lambda ls: [ls[0], *ls[2:]], 2, "removed"),
        (lambda ls: [ls[0], ls[2], ls[1], ls[3]], 2, "moved"),
        (lambda ls: [ls[1], ls[0], *ls[2:]], 1, "moved"),
        (lambda ls: [*ls, ls[3]], 5, "inserted"),
        (lambda ls: [*ls[:2], "not json", *ls[2:]], 3, "not an audit entry"),
        (lambda ls: [*ls[:3], ls[3][:-5]], 4, "not an audit entry"),
    ],
    ids=[
        "edit",
        "edit-last",
        "space",
        "delete",
        "reorder",
        "swap-first",
        "duplicate",
        "garbage",
        "cut",
    ],
)
def test_tampering_is_found_at_its_line(
    tmp_path: Path, tamper: Callable[[list[str]], list[str]], line: int, why: str
) -> None:
    # Prepare
    log = _log(tmp_path)
    _fill(log)
    assert verify(log.path) == 4
    _write(log.path, tamper(_lines(log.path)))

    # Execute / Assert
    with pytest.raises(DataError, match=rf"\bline {line}\b.*{why}"):
        verify(log.path)


def test_rehashed_edit_is_found_by_the_next_line(tmp_path: Path) -> None:
    # Prepare: an editor who also recomputes the edited line's own hash
    log = _log(tmp_path)
    _fill(log)
    lines = _lines(log.path)
    obj = json.loads(lines[1])
    obj["round"] = 9
    del obj["hash"]
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    obj["hash"] = hashlib.sha256(canonical.encode()).hexdigest()
    lines[1] = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    _write(log.path, lines)

    # Execute / Assert
    with pytest.raises(DataError, match=r"\bline 3\b.*chain"):
        verify(log.path)


def test_a_broken_last_line_stops_further_records(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _fill(log, rounds=1)
    with log.path.open("a") as f:
        f.write('{"seq": ')
    with pytest.raises(DataError, match="last line"):
        log.record(_content(), run_id=7, server_round=2, kind="train")


def test_verify_of_a_missing_log_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be read"):
        verify(tmp_path / "audit.jsonl")


@pytest.mark.parametrize(
    ("data", "last"),
    [
        (b"", None),
        (b"a\n", b"a"),
        (b"a", b"a"),
        (b"first line\nsecond, longer line\n", b"second, longer line"),
        (b"first line\nsecond, longer line", b"second, longer line"),
        (b"x" * 50 + b"\n" + b"y" * 50 + b"\n", b"y" * 50),
        (b"\n" + b"z" * 20 + b"\n", b"z" * 20),
    ],
)
@pytest.mark.parametrize("block", [1, 3, 7, 1 << 16])
def test_last_line_is_read_across_blocks(
    tmp_path: Path, data: bytes, last: bytes | None, block: int
) -> None:
    path = tmp_path / "log"
    path.write_bytes(data)
    assert _last_line(path, block=block) == last


def _append_many(path: Path, worker: int) -> None:
    content = RecordDict({"metrics": MetricRecord({"num-examples": worker})})
    for r in range(50):
        AuditLog(path).record(content, run_id=worker, server_round=r, kind="evaluate")


def test_concurrent_appends_keep_the_chain(tmp_path: Path) -> None:
    # Prepare
    path = _log(tmp_path).path
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(path, w)) for w in range(6)]

    # Execute
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)

    # Assert
    assert [p.exitcode for p in workers] == [0] * 6
    assert verify(path) == 300
