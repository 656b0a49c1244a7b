"""What `labelassist suggest` found: for a zero-shot version, the held-out accuracy and
per-class recall of its descriptions against the proposed ones, and the proposal (or why
there is none). The report shows the newest of each version, before and after.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "suggestions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_version_id", sa.Integer, sa.ForeignKey("model_versions.id"),
                  nullable=False, index=True),
        sa.Column("reviews", sa.Integer, nullable=False),
        sa.Column("vocabulary", sa.Integer, nullable=False),
        sa.Column("current_accuracy", sa.Float, nullable=False),
        sa.Column("proposed_accuracy", sa.Float, nullable=False),
        sa.Column("folds", sa.JSON, nullable=False),
        sa.Column("recall", sa.JSON, nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("additions", sa.JSON, nullable=False),
        sa.Column("retired", sa.JSON, nullable=False),
        sa.Column("held_out", sa.JSON, nullable=False),
        sa.Column("proposed", sa.JSON),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("out_path", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("suggestions")
