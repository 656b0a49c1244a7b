"""Reads shared by several commands: which model_version, and its prediction records."""

from __future__ import annotations

import threading
from collections.abc import Container, Iterator

from sqlalchemy import select

from . import Database
from .models import File, Image, ModelVersion, Prediction
from ..errors import ConfigError


def resolve_version(db: Database, name: str | None = None) -> ModelVersion:
    """The named model_version, or the newest one that has predictions."""
    with db.read() as session:
        if name:
            version = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).first()
            if version is None:
                known = session.scalars(select(ModelVersion.name).order_by(ModelVersion.id)).all()
                raise ConfigError(f"no model_version {name!r}; known: {', '.join(known) or 'none'} "
                                  "(see labelassist status)")
            return version
        version = session.scalars(
            select(ModelVersion).where(select(Prediction.id).where(
                Prediction.model_version_id == ModelVersion.id).exists())
            .order_by(ModelVersion.id.desc())).first()
        if version is None:
            raise ConfigError("no predictions yet: run labelassist predict --labels FILE first")
        return version


def resolve_zero_shot(db: Database, name: str | None = None) -> ModelVersion:
    """The zero-shot model_version that learn and suggest improve: the one named, else the
    one the newest work is based on (the newest version itself, or the zero-shot version
    a newest probe was learned from: the loop's second turn needs no --version)."""
    version = resolve_version(db, name)
    if version.kind == "zeroshot":
        return version
    base = version.label_set.get("probe", {}).get("base")
    if name is not None or not base:
        raise ConfigError(f"{version.name} is a {version.kind}; pass --version with a "
                          "zero-shot one")
    return resolve_version(db, base)


# PostgreSQL takes at most 65,535 bind parameters per statement; reviews, tasks and
# exports easily hold more ids than that, so every id list is sent in chunks.
IN_CHUNK = 10_000


def keyset_pages(db: Database, query, key, *, size: int = 5000,
                 stop: threading.Event | None = None) -> Iterator[list]:
    """The rows of `query`, a page at a time in the order of `key` (an id column, which
    each row must hold first), each page read in its own short session: memory stays flat
    whatever the ledger's size, and no read stays open across the caller's work on a page.
    `stop` ends it between pages."""
    last = 0
    while stop is None or not stop.is_set():
        with db.read() as session:
            rows = session.execute(query.where(key > last).order_by(key).limit(size)).all()
        if not rows:
            return
        last = rows[-1][0]
        yield rows


def rows_in_chunks(session, make_query, ids, *, scalars: bool = False) -> list:
    """Run make_query(chunk) for each chunk of `ids` (an IN list) and gather the rows."""
    ids = list(ids)
    run = session.scalars if scalars else session.execute
    return [row for start in range(0, len(ids), IN_CHUNK)
            for row in run(make_query(ids[start:start + IN_CHUNK])).all()]


def first_files(session, image_ids) -> dict[int, tuple[str, str | bytes]]:
    """Per image, its first readable file (the least path): (path for people, path for
    the filesystem). The second is the raw bytes of a name that is not UTF-8."""
    rows = rows_in_chunks(session, lambda chunk: select(File.image_id, File.path, File.raw_path)
                          .where(File.image_id.in_(chunk), File.error.is_(None)), image_ids)
    files: dict[int, tuple[str, str | bytes]] = {}
    for image_id, path, raw in sorted(rows, key=lambda r: (r[0], r[1])):
        files.setdefault(image_id, (path, raw or path))
    return files


def first_paths(session, image_ids) -> dict[int, str]:
    """One readable path per image (the first registered) for display and export."""
    return {image_id: path for image_id, (path, _) in first_files(session, image_ids).items()}


def prediction_records(db: Database, version: ModelVersion, chunk: int = 2000,
                       flagged: Container[int] = frozenset()) -> Iterator[dict]:
    """The prediction record (docs/formats.md, "Prediction records"): path, sha256, label,
    confidence, margin, scores, model_version, similarity, out_of_set (in `flagged`)."""
    query = (select(Prediction.id, Prediction, Image.sha256)
             .join(Image, Image.id == Prediction.image_id)
             .where(Prediction.model_version_id == version.id))
    for rows in keyset_pages(db, query, Prediction.id, size=chunk):
        with db.read() as session:
            paths = first_paths(session, [p.image_id for _, p, _ in rows])
        for _, prediction, sha in rows:
            yield {"path": paths.get(prediction.image_id), "sha256": sha,
                   "label": prediction.label, "confidence": prediction.confidence,
                   "margin": prediction.margin, "scores": prediction.scores,
                   "model_version": version.name, "similarity": prediction.similarity,
                   "out_of_set": prediction.image_id in flagged}
