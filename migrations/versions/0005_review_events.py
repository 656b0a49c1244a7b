"""Review events journal: what a Label Studio webhook named, written before `serve`
answers it and marked done once the reviews are stored, so a crash or a Label Studio that
is down loses nothing (the events are replayed in order).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ls_review_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("ls_projects.id"), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("tasks", sa.JSON, nullable=False),
        sa.Column("orphans", sa.JSON, nullable=False),
        sa.Column("expect", sa.JSON, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
    )
    op.create_index("ix_ls_review_events_pending", "ls_review_events", ["project_id", "done_at"])


def downgrade() -> None:
    op.drop_index("ix_ls_review_events_pending", "ls_review_events")
    op.drop_table("ls_review_events")
