"""Files in object storage (s3://bucket/key): each keeps the ETag it had when ingested.
An object has no mtime to trust (a copy gets a new one, a rewrite in the same second
may not), so ingest decides "changed" by ETag and size, and predict, export and push
read an object only while it still has that ETag. NULL for files on disk, which go by
size and mtime_ns as before.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("etag", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_column("etag")
