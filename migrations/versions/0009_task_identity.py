"""Task identity: a Label Studio task id alone does not name an image (Label Studio on
SQLite gives a deleted newest task's id to the next task made in the project). Each task
row keeps what its data said about its image when it was recorded (`image_key`: the
pushed sha256, or the image address of a task labelassist fetched), and a task that was
deleted in Label Studio leaves a tombstone, so push does not make it again.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows from before keep NULL: they are matched on the sha256 a pushed task carries.
    with op.batch_alter_table("ls_tasks") as batch:
        batch.add_column(sa.Column("image_key", sa.Text))
    op.create_table(
        "ls_deleted_tasks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("ls_projects.id"), nullable=False),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id"), nullable=False),
        sa.Column("ls_task_id", sa.Integer, nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("project_id", "image_id"),
    )


def downgrade() -> None:
    op.drop_table("ls_deleted_tasks")
    with op.batch_alter_table("ls_tasks") as batch:
        batch.drop_column("image_key")
