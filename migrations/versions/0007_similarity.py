"""Each zero-shot prediction's similarity: the cosine of the image to its closest class
description. An image far below the reviewed images of its class matches none of the
classes well (noise, a page of text, an empty frame): it is flagged out of set, never
auto-accepted, and reviewed first. Null for predictions made before (re-scoring fills it)
and for probes, whose flags come from their zero-shot base.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("similarity", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("similarity")
