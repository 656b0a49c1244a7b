"""What `predict --dtype auto` measured on a CPU: every runtime's speed and its agreement
with torch fp32 on the workspace's own images, and the one chosen. Keyed by the model's
torch model_key, the prompt set, the kind of CPU and the software versions, so a later
predict reuses it and a new CPU or a new OpenVINO measures again.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runtime_choices",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_key", sa.String(200), nullable=False),
        sa.Column("label_fingerprint", sa.String(64), nullable=False),
        sa.Column("cpu", sa.String(200), nullable=False),
        sa.Column("software", sa.String(200), nullable=False),
        sa.Column("runtime", sa.String(100), nullable=False),
        sa.Column("model_version", sa.String(200), nullable=False, index=True),
        sa.Column("measurement", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_runtime_choices_lookup", "runtime_choices",
                    ["model_key", "label_fingerprint", "cpu", "software"])


def downgrade() -> None:
    op.drop_index("ix_runtime_choices_lookup", "runtime_choices")
    op.drop_table("runtime_choices")
