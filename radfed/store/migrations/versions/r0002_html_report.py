"""Keep each run's rendered HTML bias report in the store, so that the dashboard can show
it without access to the server's run folder.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("html_mtime", sa.Float, nullable=True))
        batch.add_column(sa.Column("html_report", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("html_report")
        batch.drop_column("html_mtime")
