"""Bring the store up to date with a run folder: read what is new since the last sync.

A run folder is append-only but for three files that are replaced (``bias_report.json``
every evaluated round, ``bias_report.html`` at the end, ``config.json`` when a run starts
again) and ``metrics.jsonl``, which a resumed run truncates to its last completed round.
The store remembers how many bytes of ``metrics.jsonl`` and ``events.jsonl`` it has read,
reads only complete lines past them, and re-reads a file that became shorter. The same
function serves the live run (after every event) and ``radfed store import RUNDIR``, so a
store that was down catches up on the next sync with nothing lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from radfed.errors import ConfigError
from radfed.folders import RunEvent, RunFiles
from radfed.store.schema import cells, events, gaps, metrics, reports, rounds, runs, sites

__all__ = ["REFUSAL_CODES", "run_id_of", "sync_run"]

#: Site error codes that mean the site's own policy refused (radfed.federation.codes).
REFUSAL_CODES = frozenset({3005, 3006, 3007})

_HEADLINES = {"classification": "auc", "detection": "ap50", "segmentation": "dice_mean"}


def run_id_of(files: RunFiles, document: Mapping[str, Any]) -> str:
    """The run's id: config.json's ``run-id``; for a folder written before radfed kept one,
    a digest of its resolved path and its config.json, stable across imports."""
    given = document.get("run-id")
    if isinstance(given, str | int) and not isinstance(given, bool) and str(given):
        return str(given)
    digest = hashlib.sha256(str(files.path.resolve()).encode() + files.config.read_bytes())
    return digest.hexdigest()[:32]


def sync_run(engine: Engine, run_dir: Path) -> str:
    """Read what is new in ``run_dir`` into the store, in one transaction.

    Returns:
        The run's id.

    Raises:
        ConfigError: ``run_dir`` is not a run folder (no readable config.json).
    """
    files = RunFiles(run_dir)
    try:
        document = files.read_config()
    except (OSError, ValueError):
        msg = f"{run_dir} is not a run folder (no readable config.json); give a run's --out"
        raise ConfigError(msg) from None
    run_id = run_id_of(files, document)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
        if row is None:
            conn.execute(insert(runs).values(**_new_run(run_id, files, document, now)))
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one()
        changes: dict[str, Any] = {"updated_at": now}
        changes.update(_sync_metrics(conn, run_id, files.metrics, int(row["metrics_offset"])))
        changes.update(
            _sync_events(conn, run_id, files.events, int(row["events_offset"]), dict(row))
        )
        _sync_report(conn, run_id, files.bias_report)
        html = _read_html(files.bias_report_html, row["html_mtime"])
        if html is not None:
            changes["html_mtime"], changes["html_report"] = html
        if not files.events.is_file():  # a folder from before events.jsonl: judge by rounds
            done = conn.execute(
                select(metrics.c.round)
                .where(metrics.c.run_id == run_id)
                .order_by(metrics.c.round.desc())
            ).first()
            changes["rounds_done"] = int(done[0]) if done else 0
            finished = changes["rounds_done"] >= int(row["rounds_planned"])
            changes["status"] = "finished" if finished else "incomplete"
        conn.execute(update(runs).where(runs.c.id == run_id).values(**changes))
    return run_id


def _new_run(
    run_id: str, files: RunFiles, document: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    config = dict(document.get("run-config", {}))
    task = str(config.get("task", "classification"))
    started = _mtime(files.config)
    return {
        "id": run_id,
        "name": files.path.resolve().name,
        "folder": str(files.path.resolve()),
        "task": task,
        "strategy": str(config.get("strategy", "fedavg")),
        "headline": _HEADLINES.get(task, "auc"),
        "status": "running",
        "status_reason": None,
        "rounds_planned": int(config.get("num-server-rounds", 0)),
        "rounds_done": 0,
        "config": config,
        "radfed_version": str(document.get("radfed-version", "")),
        "stats_schema": document.get("stats-schema-version"),
        "started_at": started,
        "ended_at": None,
        "updated_at": now,
        "metrics_offset": 0,
        "events_offset": 0,
        "html_mtime": None,
        "html_report": None,
    }


def _new_lines(path: Path, offset: int) -> tuple[list[tuple[int, dict[str, Any]]], int, bool]:
    """The complete lines of ``path`` after byte ``offset``, each with its own offset.

    Returns:
        (offset, parsed line) pairs, the new offset, and whether the file was rewritten
        (shorter than ``offset``: everything is read again from the start).
    """
    if not path.is_file():
        return [], offset, False
    data = path.read_bytes()
    rewritten = len(data) < offset
    start = 0 if rewritten else offset
    end = data.rfind(b"\n") + 1
    out: list[tuple[int, dict[str, Any]]] = []
    position = start
    for raw in data[start:end].splitlines(keepends=True):
        text = raw.strip()
        if text:
            with contextlib.suppress(ValueError):  # a line cut by a crash: skip only it
                out.append((position, _loads(text)))
        position += len(raw)
    return out, max(end, start), rewritten


def _sync_metrics(conn: Connection, run_id: str, path: Path, offset: int) -> dict[str, Any]:
    lines, new_offset, rewritten = _new_lines(path, offset)
    if rewritten:
        conn.execute(delete(metrics).where(metrics.c.run_id == run_id))
    rows = [
        {
            "run_id": run_id,
            "round": int(line["round"]),
            "site": str(line["site"]),
            "split": str(line["split"]),
            "n": line.get("n"),
            "suppressed": bool(line.get("suppressed", False)),
            "noise_sd": line.get("noise_sd"),
            "values": dict(line.get("metrics", {})),
        }
        for _, line in lines
    ]
    _upsert(conn, metrics, rows)
    return {"metrics_offset": new_offset}


def _sync_events(
    conn: Connection, run_id: str, path: Path, offset: int, run: dict[str, Any]
) -> dict[str, Any]:
    lines, new_offset, rewritten = _new_lines(path, offset)
    if rewritten:  # a new run in the same folder has its own id; this is a damaged file
        conn.execute(delete(events).where(events.c.run_id == run_id))
    state = _SiteBook(conn, run_id)
    changes: dict[str, Any] = {"events_offset": new_offset}
    event_rows = []
    for position, line in lines:
        at = _when(line.get("at"))
        kind = str(line.get("kind", ""))
        round_ = line.get("round")
        event_rows.append(
            {
                "run_id": run_id,
                "seq": position,
                "at": at,
                "round": round_,
                "kind": kind[:32],
                "level": str(line.get("level", "info"))[:8],
                "site": line.get("site"),
                "message": str(line.get("message", "")),
            }
        )
        _apply(conn, run_id, run, state, changes, (kind, at, round_), line)
    _upsert(conn, events, event_rows, keys=("run_id", "seq"))
    state.save()
    return changes


def _apply(
    conn: Connection,
    run_id: str,
    run: Mapping[str, Any],
    book: _SiteBook,
    changes: dict[str, Any],
    head: tuple[str, datetime, int | None],
    line: Mapping[str, Any],
) -> None:
    """What one event changes in the runs, rounds and sites tables."""
    kind, at, round_ = head
    site = line.get("site")
    if kind in (RunEvent.RUN_STARTED, RunEvent.RUN_RESUMED):
        changes.update(status="running", status_reason=None, ended_at=None)
        if kind == RunEvent.RUN_STARTED:
            changes["started_at"] = at
        for name in line.get("sites", []) or []:
            book.touch(str(name), state="expected", reason="not seen yet")
    elif kind in (RunEvent.WAITING, RunEvent.LATE):
        for name in line.get("missing", []) or []:
            seen = book.get(str(name)).get("last_seen") is not None
            state = "late" if kind == RunEvent.LATE or seen else "waiting"
            book.touch(str(name), state=state, reason=str(line.get("message", "")))
    elif kind == RunEvent.PHASE_STARTED and round_ is not None:
        _upsert(
            conn,
            rounds,
            [
                {
                    "run_id": run_id,
                    "round": round_,
                    "phase": str(line.get("phase", "")),
                    "asked": int(line.get("asked", 0)),
                    "replied": 0,
                    "dropped": {},
                    "started_at": at,
                    "ended_at": None,
                }
            ],
        )
    elif kind == RunEvent.PHASE_ENDED and round_ is not None:
        replied = [str(s) for s in line.get("replied", []) or []]
        dropped = {str(k): str(v) for k, v in (line.get("dropped", {}) or {}).items()}
        conn.execute(
            update(rounds)
            .where(
                (rounds.c.run_id == run_id)
                & (rounds.c.round == round_)
                & (rounds.c.phase == str(line.get("phase", "")))
            )
            .values(replied=len(replied), dropped=dropped, ended_at=at)
        )
        for name in replied:
            entry = book.touch(name, state="connected", reason=None, seen=at)
            entry["replies"] = int(entry["replies"]) + 1
        for name in line.get("silent", []) or []:
            entry = book.touch(
                str(name), state="late", reason=f"no reply to {line.get('phase')} in time"
            )
            entry["failures"] = int(entry["failures"]) + 1
    elif kind == RunEvent.SITE_ERROR and site:
        code = str(line.get("code", ""))
        refused = bool(line.get("refusal")) or int(line.get("code", 0) or 0) in REFUSAL_CODES
        entry = book.touch(
            str(site),
            state="refused" if refused else "failed",
            reason=str(line.get("message")),
            seen=at,
        )
        if refused:
            entry["refusals"] = {**entry["refusals"], code: int(entry["refusals"].get(code, 0)) + 1}
        else:
            entry["failures"] = int(entry["failures"]) + 1
    elif kind in (RunEvent.DROPPED, RunEvent.SECURITY) and site:
        entry = book.touch(str(site), state="failed", reason=str(line.get("message")), seen=at)
        entry["failures"] = int(entry["failures"]) + 1
    elif kind == RunEvent.ROUND_ENDED and round_ is not None:
        changes["rounds_done"] = max(int(changes.get("rounds_done", run["rounds_done"])), round_)
    elif kind == RunEvent.RUN_FINISHED:
        changes.update(status="finished", status_reason=None, ended_at=at)
        for name, entry in list(book.rows.items()):
            if entry["state"] == "connected":
                book.touch(name, state="finished", reason=None)
    elif kind == RunEvent.RUN_FAILED:
        changes.update(status="failed", status_reason=str(line.get("message", "")), ended_at=at)


class _SiteBook:
    """The run's site rows, changed in memory by events and written back once."""

    def __init__(self, conn: Connection, run_id: str) -> None:
        self.conn, self.run_id = conn, run_id
        found = conn.execute(select(sites).where(sites.c.run_id == run_id)).mappings()
        self.rows: dict[str, dict[str, Any]] = {r["name"]: dict(r) for r in found}
        self.changed: set[str] = set()

    def get(self, name: str) -> dict[str, Any]:
        return self.rows.get(name) or {
            "run_id": self.run_id,
            "name": name,
            "state": "expected",
            "reason": None,
            "first_seen": None,
            "last_seen": None,
            "replies": 0,
            "failures": 0,
            "refusals": {},
        }

    def touch(
        self, name: str, *, state: str, reason: str | None, seen: datetime | None = None
    ) -> dict[str, Any]:
        entry = self.rows.setdefault(name[:255], self.get(name[:255]))
        entry["state"], entry["reason"] = state, reason
        if seen is not None:
            entry["first_seen"] = entry["first_seen"] or seen
            entry["last_seen"] = seen
        self.changed.add(name[:255])
        return entry

    def save(self) -> None:
        _upsert(self.conn, sites, [self.rows[name] for name in sorted(self.changed)])


def _sync_report(conn: Connection, run_id: str, path: Path) -> None:
    """Store the bias report version on disk unless this very file is in already."""
    if not path.is_file():
        return
    written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    try:
        document = _loads(path.read_text())
        round_ = int(document["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # being replaced right now (never half-written: os.replace); next sync
    stored = conn.execute(
        select(reports.c.written_at).where(
            (reports.c.run_id == run_id) & (reports.c.round == round_)
        )
    ).first()
    if stored is not None and _when(stored[0]) == written:
        return
    conn.execute(delete(cells).where((cells.c.run_id == run_id) & (cells.c.round == round_)))
    conn.execute(delete(gaps).where((gaps.c.run_id == run_id) & (gaps.c.round == round_)))
    _upsert(
        conn,
        reports,
        [
            {
                "run_id": run_id,
                "round": round_,
                "written_at": written,
                "format_version": int(document.get("format_version", 0)),
                "summary": document.get("summary", {}),
                "document": document,
            }
        ],
    )
    cell_rows, gap_rows = [], []
    for split, part in (document.get("splits") or {}).items():
        for cell in part.get("cells", []):
            cell_rows.append(
                {
                    "run_id": run_id,
                    "round": round_,
                    "split": split,
                    "site": str(cell.get("site")),
                    "attribute": str(cell.get("attribute")),
                    "group": str(cell.get("group")),
                    "n": cell.get("n"),
                    "suppressed": bool(cell.get("suppressed")),
                    "values": cell.get("metrics", {}),
                }
            )
        for gap in part.get("gaps", []):
            gap_rows.append(_gap_row(run_id, round_, split, gap))
    if cell_rows:
        conn.execute(insert(cells), cell_rows)
    if gap_rows:
        conn.execute(insert(gaps), gap_rows)


def _gap_row(run_id: str, round_: int, split: str, gap: Mapping[str, Any]) -> dict[str, Any]:
    difference = gap.get("difference") or {}
    sides: list[Mapping[str, Any]] = [
        side for k in ("worst", "best", "group", "rest") if isinstance(side := gap.get(k), Mapping)
    ]
    attribution = gap.get("attribution") or {}
    return {
        "run_id": run_id,
        "round": round_,
        "split": split,
        "site": str(gap.get("site")),
        "attribute": str(gap.get("attribute")),
        "metric": str(gap.get("metric")),
        "comparison": str(gap.get("comparison", "")),
        "verdict": str(gap.get("verdict", "")),
        "difference": difference.get("value"),
        "low": difference.get("low"),
        "high": difference.get("high"),
        "first_group": str(sides[0].get("group")) if sides else None,
        "second_group": str(sides[1].get("group")) if len(sides) > 1 else None,
        "confounded": bool(attribution.get("confounded_with_site", False)),
        "document": dict(gap),
    }


def _read_html(path: Path, stored_mtime: float | None) -> tuple[float, str] | None:
    if not path.is_file():
        return None
    mtime = path.stat().st_mtime
    if stored_mtime is not None and abs(mtime - stored_mtime) < 1e-6:
        return None
    return mtime, path.read_text(errors="replace")


def _loads(text: str | bytes) -> Any:
    """JSON as the store keeps it: NaN and infinities (an undefined metric) become null,
    which PostgreSQL's JSONB and strict JSON readers accept."""
    return json.loads(text, parse_constant=lambda _: None)


def _upsert(
    conn: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    keys: Iterable[str] | None = None,
) -> None:
    """Insert ``rows``, replacing rows with the same key (primary key unless ``keys``)."""
    if not rows:
        return
    names = list(keys) if keys is not None else [c.name for c in table.primary_key.columns]
    dialect = conn.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        for row in rows:  # portable: delete, then insert
            conn.execute(delete(table).where(*(table.c[k] == row[k] for k in names)))
            conn.execute(insert(table).values(**row))
        return
    module = sqlite if dialect == "sqlite" else postgresql
    statement = module.insert(table)
    kept = [c.name for c in table.columns if c.name not in names and c.name in rows[0]]
    statement = statement.on_conflict_do_update(
        index_elements=names, set_={c: statement.excluded[c] for c in kept}
    )
    for start in range(0, len(rows), 500):
        conn.execute(statement, list(rows[start : start + 500]))


def _when(value: Any) -> datetime:
    """A stored or written time as an aware UTC datetime (SQLite gives naive ones back)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return datetime.now(UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except OSError:
        return None
