"""Work claims and a worker registry, so several workers never encode the same image
and a crashed worker's batch is taken over.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("model_version_id", sa.Integer, sa.ForeignKey("model_versions.id")),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("stopped_at", TS),
    )
    op.create_table(
        "claims",
        sa.Column("model_version_id", sa.Integer, sa.ForeignKey("model_versions.id"),
                  primary_key=True),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id"), primary_key=True),
        sa.Column("worker_id", sa.Integer, sa.ForeignKey("workers.id"), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_index("ix_claims_worker_id", "claims", ["worker_id"])


def downgrade() -> None:
    op.drop_table("claims")
    op.drop_table("workers")
