"""The ledger. Alembic (migrations/) owns the schema; these classes mirror its head.

Images are keyed by content (sha256): the same bytes under two paths are one
image with two `files` rows, so they are predicted, pushed and reviewed once.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """A stored time, aware: SQLite gives back naive datetimes, and we store UTC."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Image(Base):
    """One distinct content. `error` is set when decoding failed at predict time."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(String(32))
    error_detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class File(Base):
    """A path seen by ingest. image_id is NULL while the file is not a readable image."""

    __tablename__ = "files"
    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    # The exact bytes of a path that is not valid UTF-8 (`path` then holds a readable form).
    raw_path: Mapped[bytes | None] = mapped_column(LargeBinary)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), index=True)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    # An object's ETag (objectstore.py): it, not mtime, says the object changed. NULL on disk.
    etag: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(String(32))
    error_detail: Mapped[str | None] = mapped_column(Text)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelVersion(Base):
    """A model plus a prompt set (or a probe): the unit Label Studio calls model_version."""

    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="zeroshot")
    model_id: Mapped[str] = mapped_column(Text)
    # Which stored embeddings this version reads: one per (model, revision).
    model_key: Mapped[str] = mapped_column(String(200), index=True)
    label_set: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Embedding(Base):
    """L2-normalised float32 image embedding, reused by every prompt set of that model."""

    __tablename__ = "embeddings"
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    model_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("image_id", "model_version_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    label: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float] = mapped_column(Float)
    margin: Mapped[float] = mapped_column(Float)
    scores: Mapped[dict] = mapped_column(JSON)
    # Zero-shot only: cosine of the image to its closest class description (outofset.py).
    similarity: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LSProject(Base):
    """A Label Studio project that labelassist pushes to (no token is ever stored)."""

    __tablename__ = "ls_projects"
    __table_args__ = (UniqueConstraint("url", "ls_project_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    ls_project_id: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(Text)
    classes: Mapped[list] = mapped_column(JSON)
    image_mode: Mapped[str] = mapped_column(String(16))
    last_pull_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LSTask(Base):
    __tablename__ = "ls_tasks"
    __table_args__ = (UniqueConstraint("project_id", "image_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("ls_projects.id"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    ls_task_id: Mapped[int] = mapped_column(Integer, index=True)
    # What the task's data said about its image when it was recorded (labelstudio/tasks.py):
    # a task is taken for this image only while its data still says so. NULL: recorded
    # before keys were kept (a pushed task is then matched on its data's sha256).
    image_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LSDeletedTask(Base):
    """A task deleted in Label Studio (or whose id now names another task): its image is
    not made a task again in that project by push; serve may adopt a new task for it."""

    __tablename__ = "ls_deleted_tasks"
    __table_args__ = (UniqueConstraint("project_id", "image_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("ls_projects.id"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    ls_task_id: Mapped[int] = mapped_column(Integer)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LSPrediction(Base):
    """Which model_version's prediction a task already carries in Label Studio."""

    __tablename__ = "ls_predictions"
    __table_args__ = (UniqueConstraint("task_id", "model_version_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("ls_tasks.id"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Annotation(Base):
    """A reviewer's answer, pulled from Label Studio. The human label is the truth."""

    __tablename__ = "annotations"
    __table_args__ = (UniqueConstraint("project_id", "ls_annotation_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("ls_projects.id"))
    ls_annotation_id: Mapped[int] = mapped_column(Integer)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    label: Mapped[str | None] = mapped_column(Text)
    cancelled: Mapped[bool] = mapped_column(Boolean, default=False)
    # The prediction the reviewer started from, and whether they kept it unchanged.
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    accepted_prediction: Mapped[bool | None] = mapped_column(Boolean)
    annotator: Mapped[str | None] = mapped_column(Text)
    lead_time: Mapped[float | None] = mapped_column(Float)
    ls_created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ls_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    pulled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AutoAccept(Base):
    """A prediction trusted without review (`accept`); never presented as human work."""

    __tablename__ = "auto_accepts"
    __table_args__ = (UniqueConstraint("image_id", "model_version_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    label: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    target_precision: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Worker(Base):
    """A running (or dead) predict worker; its heartbeat keeps its claims alive."""

    __tablename__ = "workers"
    id: Mapped[int] = mapped_column(primary_key=True)
    hostname: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Claim(Base):
    """An image a worker is encoding for a model_version, until expires_at."""

    __tablename__ = "claims"
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"),
                                                  primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    worker_id: Mapped[int] = mapped_column(ForeignKey("workers.id"), index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LSPushJournal(Base):
    """An import sent (or about to be sent) to Label Studio and not yet recorded here.
    kind is 'tasks' (new tasks) or 'predictions' (a new version on existing tasks)."""

    __tablename__ = "ls_push_journal"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("ls_projects.id"))
    kind: Mapped[str] = mapped_column(String(16))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    image_ids: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReviewEventRecord(Base):
    """What a Label Studio webhook named (tasks to re-read, annotations by id), journaled
    before `serve` answers it, and marked done once the reviews are stored: a crash, or a
    Label Studio that is down, loses nothing, and the events are replayed in order."""

    __tablename__ = "ls_review_events"
    __table_args__ = (Index("ix_ls_review_events_pending", "project_id", "done_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("ls_projects.id"))
    action: Mapped[str] = mapped_column(String(32))
    tasks: Mapped[list] = mapped_column(JSON)
    orphans: Mapped[list] = mapped_column(JSON)
    expect: Mapped[dict] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


class Suggestion(Base):
    """What `suggest` found for a zero-shot version: held-out accuracy and per-class recall
    of the current descriptions against the proposed ones, and the proposal (None: no gain
    that held across folds, with the reason)."""

    __tablename__ = "suggestions"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    reviews: Mapped[int] = mapped_column(Integer)
    vocabulary: Mapped[int] = mapped_column(Integer)
    current_accuracy: Mapped[float] = mapped_column(Float)
    proposed_accuracy: Mapped[float] = mapped_column(Float)
    folds: Mapped[list] = mapped_column(JSON)
    recall: Mapped[dict] = mapped_column(JSON)
    mode: Mapped[str] = mapped_column(String(16))
    additions: Mapped[list] = mapped_column(JSON)
    retired: Mapped[list] = mapped_column(JSON)   # [class, description] dropped
    held_out: Mapped[dict] = mapped_column(JSON)  # fixed, broken, folds_gaining, p_value
    proposed: Mapped[dict | None] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(Text)
    out_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RuntimeChoice(Base):
    """What `predict --dtype auto` measured on a CPU (runtimes/choice.py): each runtime's
    images/s, top-1 agreement and drift against torch fp32, and the runtime chosen."""

    __tablename__ = "runtime_choices"
    __table_args__ = (Index("ix_runtime_choices_lookup", "model_key", "label_fingerprint",
                            "cpu", "software"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_key: Mapped[str] = mapped_column(String(200))  # the torch key: name@revision
    label_fingerprint: Mapped[str] = mapped_column(String(64))
    cpu: Mapped[str] = mapped_column(String(200))
    software: Mapped[str] = mapped_column(String(200))
    runtime: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(200), index=True)  # what it predicts as
    measurement: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Lock(Base):
    """A named lease: who holds it and until when (locks.py)."""

    __tablename__ = "locks"
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    holder: Mapped[str] = mapped_column(Text)
    hostname: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
