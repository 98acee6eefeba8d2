"""The run store's tables (SQLAlchemy Core), as the newest migration leaves them.

The migrations under ``radfed/store/migrations/versions`` create these tables; a test checks
that upgrading an empty database to the newest revision gives exactly this metadata.
Every fact comes from a run folder (``config.json``, ``metrics.jsonl``, ``events.jsonl``,
``bias_report.json`` and ``.html``); the store is an index of them, never the only copy.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = [
    "cells",
    "events",
    "gaps",
    "metadata",
    "metrics",
    "reports",
    "rounds",
    "runs",
    "sites",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _run_id(*, key: bool = False) -> Column[str]:
    """The run a row belongs to (deleted with it); ``key``: part of the primary key."""
    return Column(
        "run_id",
        String(64),
        ForeignKey("runs.id", ondelete="CASCADE"),
        nullable=False,
        primary_key=key,
    )


#: One row per run: what it is, how far it got, and how much of its folder was read.
runs = Table(
    "runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("folder", Text, nullable=False),
    Column("task", String(32), nullable=False),
    Column("strategy", String(32), nullable=False),
    Column("headline", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("status_reason", Text, nullable=True),
    Column("rounds_planned", Integer, nullable=False),
    Column("rounds_done", Integer, nullable=False, default=0),
    Column("config", JSON, nullable=False),
    Column("radfed_version", String(32), nullable=False),
    Column("stats_schema", Integer, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # How far the run folder has been read (bytes of complete lines), so that a sync
    # reads only what is new, and which report versions are in.
    Column("metrics_offset", Integer, nullable=False, default=0),
    Column("events_offset", Integer, nullable=False, default=0),
    Column("html_mtime", Float, nullable=True),
    Column("html_report", Text, nullable=True),
)

#: One row per (run, round, phase): who was asked, who replied, who was dropped and why.
rounds = Table(
    "rounds",
    metadata,
    _run_id(key=True),
    Column("round", Integer, primary_key=True),
    Column("phase", String(16), primary_key=True),
    Column("asked", Integer, nullable=False, default=0),
    Column("replied", Integer, nullable=False, default=0),
    Column("dropped", JSON, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("ended_at", DateTime(timezone=True), nullable=True),
)

#: One row per (run, site): its state now and its history in counts.
sites = Table(
    "sites",
    metadata,
    _run_id(key=True),
    Column("name", String(255), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("first_seen", DateTime(timezone=True), nullable=True),
    Column("last_seen", DateTime(timezone=True), nullable=True),
    Column("replies", Integer, nullable=False, default=0),
    Column("failures", Integer, nullable=False, default=0),
    Column("refusals", JSON, nullable=False),
)

#: metrics.jsonl: one row per (run, round, site, split); site ``ALL`` is the pool.
metrics = Table(
    "metrics",
    metadata,
    _run_id(key=True),
    Column("round", Integer, primary_key=True),
    Column("site", String(255), primary_key=True),
    Column("split", String(16), primary_key=True),
    Column("n", Integer, nullable=True),
    Column("suppressed", Boolean, nullable=False),
    Column("noise_sd", Float, nullable=True),
    Column("values", JSON, nullable=False),
)

#: Every version of the bias report (one per evaluated round, 0: before training).
reports = Table(
    "reports",
    metadata,
    _run_id(key=True),
    Column("round", Integer, primary_key=True),
    Column("written_at", DateTime(timezone=True), nullable=False),
    Column("format_version", Integer, nullable=False),
    Column("summary", JSON, nullable=False),
    Column("document", JSON, nullable=False),
)

#: The subgroup cells of each report version.
cells = Table(
    "cells",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _run_id(),
    Column("round", Integer, nullable=False),
    Column("split", String(16), nullable=False),
    Column("site", String(255), nullable=False),
    Column("attribute", String(255), nullable=False),
    Column("group", String(255), nullable=False),
    Column("n", Integer, nullable=True),
    Column("suppressed", Boolean, nullable=False),
    Column("values", JSON, nullable=False),
    Index(None, "run_id", "round"),
)

#: The gaps of each report version, with their verdicts.
gaps = Table(
    "gaps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _run_id(),
    Column("round", Integer, nullable=False),
    Column("split", String(16), nullable=False),
    Column("site", String(255), nullable=False),
    Column("attribute", String(255), nullable=False),
    Column("metric", String(32), nullable=False),
    Column("comparison", String(32), nullable=False),
    Column("verdict", String(32), nullable=False),
    Column("difference", Float, nullable=True),
    Column("low", Float, nullable=True),
    Column("high", Float, nullable=True),
    Column("first_group", String(255), nullable=True),
    Column("second_group", String(255), nullable=True),
    Column("confounded", Boolean, nullable=False),
    Column("document", JSON, nullable=False),
    Index(None, "run_id", "round"),
)

#: events.jsonl: what happened, in order (sites waited for, dropped, refused; security).
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _run_id(),
    Column("seq", Integer, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("round", Integer, nullable=True),
    Column("kind", String(32), nullable=False),
    Column("level", String(8), nullable=False),
    Column("site", String(255), nullable=True),
    Column("message", Text, nullable=False),
    Index(None, "run_id", "seq", unique=True),
)
