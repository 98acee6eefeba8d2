"""The first schema: runs, rounds, sites, metrics, report versions, cells, gaps, events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _run_id(table: str) -> sa.Column[str]:
    """The run a row belongs to; composite primary keys are named by their constraint."""
    return sa.Column(
        "run_id",
        sa.String(64),
        sa.ForeignKey("runs.id", ondelete="CASCADE", name=f"fk_{table}_run_id_runs"),
        nullable=False,
    )


def _when(name: str, *, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("folder", sa.Text, nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("headline", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text, nullable=True),
        sa.Column("rounds_planned", sa.Integer, nullable=False),
        sa.Column("rounds_done", sa.Integer, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("radfed_version", sa.String(32), nullable=False),
        sa.Column("stats_schema", sa.Integer, nullable=True),
        _when("started_at"),
        _when("ended_at"),
        _when("updated_at", nullable=False),
        sa.Column("metrics_offset", sa.Integer, nullable=False),
        sa.Column("events_offset", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_table(
        "rounds",
        _run_id("rounds"),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("asked", sa.Integer, nullable=False),
        sa.Column("replied", sa.Integer, nullable=False),
        sa.Column("dropped", sa.JSON, nullable=False),
        _when("started_at"),
        _when("ended_at"),
        sa.PrimaryKeyConstraint("run_id", "round", "phase", name="pk_rounds"),
    )
    op.create_table(
        "sites",
        _run_id("sites"),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        _when("first_seen"),
        _when("last_seen"),
        sa.Column("replies", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("refusals", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "name", name="pk_sites"),
    )
    op.create_table(
        "metrics",
        _run_id("metrics"),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("site", sa.String(255), nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("n", sa.Integer, nullable=True),
        sa.Column("suppressed", sa.Boolean, nullable=False),
        sa.Column("noise_sd", sa.Float, nullable=True),
        sa.Column("values", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "round", "site", "split", name="pk_metrics"),
    )
    op.create_table(
        "reports",
        _run_id("reports"),
        sa.Column("round", sa.Integer, nullable=False),
        _when("written_at", nullable=False),
        sa.Column("format_version", sa.Integer, nullable=False),
        sa.Column("summary", sa.JSON, nullable=False),
        sa.Column("document", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "round", name="pk_reports"),
    )
    op.create_table(
        "cells",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        _run_id("cells"),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("site", sa.String(255), nullable=False),
        sa.Column("attribute", sa.String(255), nullable=False),
        sa.Column("group", sa.String(255), nullable=False),
        sa.Column("n", sa.Integer, nullable=True),
        sa.Column("suppressed", sa.Boolean, nullable=False),
        sa.Column("values", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cells"),
    )
    op.create_index("ix_cells_run_id_round", "cells", ["run_id", "round"])
    op.create_table(
        "gaps",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        _run_id("gaps"),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("site", sa.String(255), nullable=False),
        sa.Column("attribute", sa.String(255), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("comparison", sa.String(32), nullable=False),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("difference", sa.Float, nullable=True),
        sa.Column("low", sa.Float, nullable=True),
        sa.Column("high", sa.Float, nullable=True),
        sa.Column("first_group", sa.String(255), nullable=True),
        sa.Column("second_group", sa.String(255), nullable=True),
        sa.Column("confounded", sa.Boolean, nullable=False),
        sa.Column("document", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gaps"),
    )
    op.create_index("ix_gaps_run_id_round", "gaps", ["run_id", "round"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        _run_id("events"),
        sa.Column("seq", sa.Integer, nullable=False),
        _when("at", nullable=False),
        sa.Column("round", sa.Integer, nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("site", sa.String(255), nullable=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_run_id_seq", "events", ["run_id", "seq"], unique=True)


def downgrade() -> None:
    for table in ("events", "gaps", "cells", "reports", "metrics", "sites", "rounds", "runs"):
        op.drop_table(table)
