"""Reading the store: the facts ``radfed runs`` prints and the dashboard shows, as JSON.

Every function returns plain JSON-ready values (times as ISO 8601 strings), so that the
terminal, ``--json`` and the dashboard's API show the same facts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select

from radfed.errors import ConfigError
from radfed.folders import POOLED_SITE
from radfed.store.schema import events, gaps, metrics, reports, rounds, runs, sites

__all__ = ["find_run", "list_runs", "report_html", "run_curves", "run_detail", "run_events"]

#: Splits in the order a headline prefers them (held-out evidence first).
_SPLITS = ("test", "val", "train")
#: Verdicts worth a line of their own in a summary.
_SHOWN_VERDICTS = ("flagged", "inconclusive")


def list_runs(engine: Engine) -> list[dict[str, Any]]:
    """Every run, newest first, with its status, progress and latest pooled headline."""
    with engine.connect() as conn:
        found = conn.execute(select(runs).order_by(runs.c.started_at.desc())).mappings().all()
        site_counts: dict[str, int] = dict(
            conn.execute(select(sites.c.run_id, func.count()).group_by(sites.c.run_id)).all()
        )
        out = []
        for run in found:
            latest = _latest_metrics(conn, run)
            report = _latest_report(conn, run["id"])
            out.append(
                {
                    **_run_facts(run),
                    "sites": int(site_counts.get(run["id"], 0)),
                    "pooled": latest.get(POOLED_SITE),
                    "verdicts": (report or {}).get("summary", {}).get("counts", {}),
                }
            )
    return out


def find_run(engine: Engine, ref: str) -> str:
    """The id of the run that ``ref`` names: an id, a unique id prefix, or a folder name
    (the newest run of that name).

    Raises:
        ConfigError: no run, or several, match.
    """
    with engine.connect() as conn:
        exact = conn.execute(select(runs.c.id).where(runs.c.id == ref)).first()
        if exact:
            return str(exact[0])
        by_prefix = conn.execute(
            select(runs.c.id).where(runs.c.id.startswith(ref, autoescape=True))
        ).all()
        if len(by_prefix) == 1:
            return str(by_prefix[0][0])
        by_name = conn.execute(
            select(runs.c.id).where(runs.c.name == ref).order_by(runs.c.started_at.desc())
        ).first()
        if by_name:
            return str(by_name[0])
    if len(by_prefix) > 1:
        msg = f"{ref!r} is the start of {len(by_prefix)} run ids; give more of the id"
        raise ConfigError(msg)
    raise ConfigError(f"no run {ref!r} in the store; `radfed runs list` shows the runs")


def run_detail(engine: Engine, run_id: str) -> dict[str, Any]:
    """One run: its facts, sites, rounds, latest cross-site table, curves and bias verdicts.

    Raises:
        ConfigError: no such run.
    """
    with engine.connect() as conn:
        run = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
        if run is None:
            raise ConfigError(f"no run {run_id!r} in the store; `radfed runs list` shows the runs")
        headline = str(run["headline"])
        site_rows = conn.execute(
            select(sites).where(sites.c.run_id == run_id).order_by(sites.c.name)
        ).mappings()
        round_rows = conn.execute(
            select(rounds)
            .where(rounds.c.run_id == run_id)
            .order_by(rounds.c.round, rounds.c.started_at)
        ).mappings()
        metric_rows = (
            conn.execute(
                select(metrics).where(metrics.c.run_id == run_id).order_by(metrics.c.round)
            )
            .mappings()
            .all()
        )
        report = _latest_report(conn, run_id)
        gap_rows = []
        if report is not None:
            gap_rows = [
                dict(g["document"], split=g["split"])
                for g in conn.execute(
                    select(gaps)
                    .where(
                        (gaps.c.run_id == run_id)
                        & (gaps.c.round == report["round"])
                        & gaps.c.verdict.in_(_SHOWN_VERDICTS)
                    )
                    .order_by(gaps.c.id)
                ).mappings()
            ]
        versions = [
            int(r[0])
            for r in conn.execute(
                select(reports.c.round).where(reports.c.run_id == run_id).order_by(reports.c.round)
            )
        ]
    curves: dict[str, dict[str, list[list[float | int | None]]]] = defaultdict(dict)
    last_round = max((int(m["round"]) for m in metric_rows), default=None)
    table: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in metric_rows:
        value = (m["values"] or {}).get(headline)
        curves[m["split"]].setdefault(m["site"], []).append([int(m["round"]), value])
        if m["round"] == last_round:
            table[m["split"]].append(
                {
                    "site": m["site"],
                    "n": m["n"],
                    "suppressed": bool(m["suppressed"]),
                    "metrics": dict(m["values"] or {}),
                }
            )
    summary = (report or {}).get("summary", {})
    return {
        **_run_facts(run),
        "config": dict(run["config"] or {}),
        "sites": [_site_facts(s) for s in site_rows],
        "rounds": [
            {
                "round": int(r["round"]),
                "phase": r["phase"],
                "asked": int(r["asked"]),
                "replied": int(r["replied"]),
                "dropped": dict(r["dropped"] or {}),
                "started_at": _iso(r["started_at"]),
                "ended_at": _iso(r["ended_at"]),
            }
            for r in round_rows
        ],
        "latest_round": last_round,
        "latest": {split: rows for split, rows in table.items()},
        "curves": {split: dict(by_site) for split, by_site in curves.items()},
        "report": None
        if report is None
        else {
            "round": int(report["round"]),
            "versions": versions,
            "counts": summary.get("counts", {}),
            "largest_inconclusive": summary.get("largest_inconclusive", []),
            "in_sample_warnings": len(summary.get("in_sample_warnings", []) or []),
            "gaps": gap_rows,
            "has_html": run["html_report"] is not None,
        },
    }


def run_curves(engine: Engine, run_id: str, *, split: str, metric: str) -> dict[str, Any]:
    """One metric's values on one split per site (``ALL`` included) over rounds.

    ``run_detail`` carries the curves of the run's headline metric only; any other metric is
    asked for here, one (split, metric) at a time, so that a poll never carries every metric
    of every site and round.

    Returns:
        ``{"split", "metric", "curves": {site: [[round, value or None], ...]}}``, rounds in
        order; a suppressed or undefined value is None.
    """
    with engine.connect() as conn:
        found = conn.execute(
            select(metrics.c.site, metrics.c.round, metrics.c["values"])
            .where((metrics.c.run_id == run_id) & (metrics.c.split == split))
            .order_by(metrics.c.round)
        ).all()
    curves: dict[str, list[list[float | int | None]]] = {}
    for site, round_, values in found:
        value = (values or {}).get(metric)
        number = float(value) if isinstance(value, int | float) else None
        if number is not None and not math.isfinite(number):
            number = None
        curves.setdefault(str(site), []).append([int(round_), number])
    return {"split": split, "metric": metric, "curves": curves}


def run_events(
    engine: Engine, run_id: str, *, after: int = -1, limit: int = 200
) -> list[dict[str, Any]]:
    """The run's events after sequence number ``after``, oldest first, at most ``limit``
    (the newest ones when there are more)."""
    with engine.connect() as conn:
        found = (
            conn.execute(
                select(events)
                .where((events.c.run_id == run_id) & (events.c.seq > after))
                .order_by(events.c.seq.desc())
                .limit(limit)
            )
            .mappings()
            .all()
        )
    return [
        {
            "seq": int(e["seq"]),
            "at": _iso(e["at"]),
            "round": e["round"],
            "kind": e["kind"],
            "level": e["level"],
            "site": e["site"],
            "message": e["message"],
        }
        for e in reversed(found)
    ]


def report_html(engine: Engine, run_id: str) -> str | None:
    """The run's rendered HTML bias report, or None when the run has none yet."""
    with engine.connect() as conn:
        found = conn.execute(select(runs.c.html_report).where(runs.c.id == run_id)).first()
    return None if found is None or found[0] is None else str(found[0])


def _run_facts(run: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": run["id"],
        "name": run["name"],
        "folder": run["folder"],
        "task": run["task"],
        "strategy": run["strategy"],
        "headline": run["headline"],
        "status": run["status"],
        "status_reason": run["status_reason"],
        "rounds_done": int(run["rounds_done"]),
        "rounds_planned": int(run["rounds_planned"]),
        "radfed_version": run["radfed_version"],
        "started_at": _iso(run["started_at"]),
        "ended_at": _iso(run["ended_at"]),
        "updated_at": _iso(run["updated_at"]),
    }


def _site_facts(site: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "name": site["name"],
        "state": site["state"],
        "reason": site["reason"],
        "first_seen": _iso(site["first_seen"]),
        "last_seen": _iso(site["last_seen"]),
        "replies": int(site["replies"]),
        "failures": int(site["failures"]),
        "refusals": {str(k): int(v) for k, v in (site["refusals"] or {}).items()},
    }


def _latest_metrics(conn: Any, run: Mapping[Any, Any]) -> dict[str, dict[str, Any]]:
    """Per site, the headline of the latest round on the most held-out split there is."""
    last = conn.execute(
        select(func.max(metrics.c.round)).where(metrics.c.run_id == run["id"])
    ).scalar()
    if last is None:
        return {}
    found = (
        conn.execute(
            select(metrics).where((metrics.c.run_id == run["id"]) & (metrics.c.round == last))
        )
        .mappings()
        .all()
    )
    present = {m["split"] for m in found}
    split = next((s for s in _SPLITS if s in present), None)
    return {
        m["site"]: {
            "round": int(last),
            "split": split,
            "metric": run["headline"],
            "value": (m["values"] or {}).get(run["headline"]),
            "n": m["n"],
        }
        for m in found
        if m["split"] == split
    }


def _latest_report(conn: Any, run_id: str) -> dict[str, Any] | None:
    found = (
        conn.execute(
            select(reports.c.round, reports.c.summary)
            .where(reports.c.run_id == run_id)
            .order_by(reports.c.round.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return None if found is None else dict(found)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.isoformat(timespec="seconds")
