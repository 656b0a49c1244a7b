"""The ledger: images by content, files by path, model versions, embeddings,
predictions, Label Studio tasks, annotations and auto-accepts.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("format", sa.String(16)),
        sa.Column("error", sa.String(32)),
        sa.Column("error_detail", sa.Text),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "files",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("path", sa.Text, nullable=False, unique=True),
        sa.Column("raw_path", sa.LargeBinary),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id")),
        sa.Column("sha256", sa.String(64)),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("mtime_ns", sa.BigInteger, nullable=False),
        sa.Column("error", sa.String(32)),
        sa.Column("error_detail", sa.Text),
        sa.Column("first_seen", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_files_image_id", "files", ["image_id"])
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("model_key", sa.String(200), nullable=False),
        sa.Column("label_set", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_model_versions_model_key", "model_versions", ["model_key"])
    op.create_table(
        "embeddings",
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id"), primary_key=True),
        sa.Column("model_key", sa.String(200), primary_key=True),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id"), nullable=False),
        sa.Column("model_version_id", sa.Integer, sa.ForeignKey("model_versions.id"),
                  nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("margin", sa.Float, nullable=False),
        sa.Column("scores", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("image_id", "model_version_id"),
    )
    op.create_index("ix_predictions_model_version_id", "predictions", ["model_version_id"])
    op.create_table(
        "ls_projects",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("ls_project_id", sa.Integer, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("classes", sa.JSON, nullable=False),
        sa.Column("image_mode", sa.String(16), nullable=False),
        sa.Column("last_pull_at", TS),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("url", "ls_project_id"),
    )
    op.create_table(
        "ls_tasks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("ls_projects.id"), nullable=False),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id"), nullable=False),
        sa.Column("ls_task_id", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("project_id", "image_id"),
    )
    op.create_index("ix_ls_tasks_ls_task_id", "ls_tasks", ["ls_task_id"])
    op.create_table(
        "ls_predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task_id", sa.Integer, sa.ForeignKey("ls_tasks.id"), nullable=False),
        sa.Column("model_version_id", sa.Integer, sa.ForeignKey("model_versions.id"),
                  nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("task_id", "model_version_id"),
    )
    op.create_table(
        "annotations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("ls_projects.id"), nullable=False),
        sa.Column("ls_annotation_id", sa.Integer, nullable=False),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id"), nullable=False),
        sa.Column("label", sa.Text),
        sa.Column("cancelled", sa.Boolean, nullable=False),
        sa.Column("model_version_id", sa.Integer, sa.ForeignKey("model_versions.id")),
        sa.Column("accepted_prediction", sa.Boolean),
        sa.Column("annotator", sa.Text),
        sa.Column("lead_time", sa.Float),
        sa.Column("ls_created_at", TS),
        sa.Column("ls_updated_at", TS),
        sa.Column("deleted_at", TS),
        sa.Column("pulled_at", TS, nullable=False),
        sa.UniqueConstraint("project_id", "ls_annotation_id"),
    )
    op.create_index("ix_annotations_image_id", "annotations", ["image_id"])
    op.create_table(
        "auto_accepts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id"), nullable=False),
        sa.Column("model_version_id", sa.Integer, sa.ForeignKey("model_versions.id"),
                  nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("target_precision", sa.Float, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("image_id", "model_version_id"),
    )


def downgrade() -> None:
    for table in ("auto_accepts", "annotations", "ls_predictions", "ls_tasks", "ls_projects",
                  "predictions", "embeddings", "model_versions", "files", "images"):
        op.drop_table(table)
