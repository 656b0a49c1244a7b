"""A version described before anyone reviewed it: the classes it predicted, how confident
it was, and the images that match none of its classes (with their paths, for thumbnails).
The report's `preview` section (docs/formats.md, "Report JSON")."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select

from ..db import Database
from ..db.models import ModelVersion, Prediction
from ..db.queries import first_paths, keyset_pages, rows_in_chunks
from ..trust.outofset import flagged_images

EXAMPLES = 60  # out-of-set images listed, lowest similarity first
BINS = 10


def describe_version(db: Database, version: ModelVersion) -> dict:
    classes = list(version.label_set["classes"])
    labels, confidences = [], []
    query = select(Prediction.id, Prediction.label, Prediction.confidence).where(
        Prediction.model_version_id == version.id)
    for rows in keyset_pages(db, query, Prediction.id, size=20000):
        labels.extend(label for _, label, _ in rows)
        confidences.extend(confidence for _, _, confidence in rows)
    labels, confidence = np.asarray(labels, dtype=object), np.asarray(confidences, float)
    n = len(confidence)
    per_class = {}
    for c in classes:
        mine = confidence[labels == c]
        per_class[c] = {"count": int(len(mine)), "share": len(mine) / n if n else None,
                        "mean_confidence": float(mine.mean()) if len(mine) else None}
    counts, edges = np.histogram(confidence, bins=BINS, range=(0.0, 1.0))
    spread = {"bins": [{"lo": float(lo), "hi": float(hi), "count": int(k)}
                       for lo, hi, k in zip(edges[:-1], edges[1:], counts)]}
    for name, q in (("p10", 10), ("median", 50), ("p90", 90)):
        spread[name] = float(np.percentile(confidence, q)) if n else None
    return {"model_version": version.name, "kind": version.kind, "predicted": n,
            "classes": per_class, "confidence": spread,
            "out_of_set": out_of_set_examples(db, version)}


def out_of_set_examples(db: Database, version: ModelVersion) -> dict:
    """How many images are flagged, and the EXAMPLES least like any class, with the
    label this version gave them."""
    flagged = flagged_images(db, version)
    worst = sorted(flagged, key=lambda i: (flagged[i] is None, flagged[i] or 0.0, i))
    worst = worst[:EXAMPLES]
    with db.read() as s:
        label_of = dict(rows_in_chunks(s, lambda chunk: select(
            Prediction.image_id, Prediction.label).where(
            Prediction.model_version_id == version.id, Prediction.image_id.in_(chunk)), worst))
        paths = first_paths(s, worst)
    return {"flagged": len(flagged), "examples": [
        {"path": paths.get(i), "label": label_of.get(i), "similarity": flagged[i]}
        for i in worst]}


def preview_sections(db: Database, names: list[str]) -> list[dict]:
    with db.read() as s:
        versions = s.scalars(select(ModelVersion).where(ModelVersion.name.in_(names))
                             .order_by(ModelVersion.id)).all()
    return [describe_version(db, v) for v in versions]
