"""Counts per state, for `labelassist status`."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from .claims import active_workers
from . import Database
from .models import Annotation, AutoAccept, File, Image, LSTask, ModelVersion, Prediction


@dataclass
class VersionStatus:
    name: str
    predicted: int
    pending: int
    pushed: int
    reviewed: int
    auto_accepted: int
    kind: str = "zeroshot"


@dataclass
class WorkspaceStatus:
    files: int
    file_errors: dict[str, int]
    images: int
    image_errors: dict[str, int]
    versions: list[VersionStatus] = field(default_factory=list)
    workers: list[dict] = field(default_factory=list)


def _images_and_errors(session) -> tuple[int, dict[str, int]]:
    """Images with a readable file, and image errors by reason."""
    live = select(File.image_id).where(File.error.is_(None)).distinct().subquery()
    images = session.scalar(select(func.count()).select_from(live))
    image_errors = dict(session.execute(select(Image.error, func.count())
                                        .where(Image.error.is_not(None))
                                        .group_by(Image.error)).all())
    return images, image_errors


def workspace_status(db: Database) -> WorkspaceStatus:
    with db.read() as session:
        files = session.scalar(select(func.count()).select_from(File))
        file_errors = dict(session.execute(select(File.error, func.count())
                                           .where(File.error.is_not(None))
                                           .group_by(File.error)).all())
        images, image_errors = _images_and_errors(session)
        usable = images - sum(image_errors.values())
        reviewed = session.scalar(select(func.count(func.distinct(Annotation.image_id))).where(
            Annotation.deleted_at.is_(None), Annotation.cancelled.is_(False)))
        pushed = session.scalar(select(func.count(func.distinct(LSTask.image_id))))
        versions = []
        for version in session.scalars(select(ModelVersion).order_by(ModelVersion.id)):
            predicted = session.scalar(select(func.count()).where(
                Prediction.model_version_id == version.id))
            accepted = session.scalar(select(func.count()).where(
                AutoAccept.model_version_id == version.id))
            versions.append(VersionStatus(version.name, predicted, max(0, usable - predicted),
                                          pushed, reviewed, accepted, version.kind))
    return WorkspaceStatus(files, file_errors, images, image_errors, versions,
                           active_workers(db))


def progress_of(db: Database, model_id: str, label_set: dict) -> tuple[int, int] | None:
    """(predicted, predicted + pending) for the newest version of this model and prompt
    set, or None before any process has registered it."""
    with db.read() as session:
        version = next((v for v in session.scalars(
            select(ModelVersion).where(ModelVersion.model_id == model_id)
            .order_by(ModelVersion.id.desc())) if v.label_set == label_set), None)
        if version is None:
            return None
        predicted = session.scalar(select(func.count()).where(
            Prediction.model_version_id == version.id))
        images, image_errors = _images_and_errors(session)  # not the whole status: per tick
    return predicted, max(images - sum(image_errors.values()), predicted)
