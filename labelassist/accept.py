"""Auto-accept: trust unreviewed predictions above their class's audited threshold.

They are recorded in auto_accepts with their provenance (model_version, confidence,
threshold, target precision) and exported as source "auto". Label Studio is never told:
no annotation is created there, so nothing is passed off as human work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select

from .audit import audit
from .db import Database, insert_ignoring_duplicates
from .db.models import AutoAccept, Prediction, utcnow
from .queries import resolve_version
from .reviews import load_reviews

CHUNK = 5000


@dataclass
class AcceptSummary:
    model_version: str
    accepted: Counter = field(default_factory=Counter)
    thresholds: dict[str, float | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


def accept_trusted(db: Database, version_name: str | None = None, *,
                   target_precision: float = 0.99, min_support: int = 30,
                   policy: str = "majority") -> AcceptSummary:
    version = resolve_version(db, version_name)
    (result,) = audit(db, version.name, target_precision=target_precision,
                      min_support=min_support, policy=policy)
    summary = AcceptSummary(version.name)
    for cls, t in result.thresholds["per_class"].items():
        summary.thresholds[cls] = t["threshold"]
        if t["threshold"] is None:
            summary.reasons[cls] = t["reason"]
    reviews = load_reviews(db, policy)
    reviewed = set(reviews.labels) | reviews.skipped
    trusted = {c: t for c, t in summary.thresholds.items() if t is not None}
    if not trusted:
        return summary
    last = 0
    while True:  # in chunks, by id: a million predictions never sit in memory at once
        with db.read() as s:
            chunk = s.execute(select(Prediction.id, Prediction.image_id, Prediction.label,
                                     Prediction.confidence)
                              .where(Prediction.model_version_id == version.id,
                                     Prediction.id > last, Prediction.label.in_(trusted))
                              .order_by(Prediction.id).limit(CHUNK)).all()
        if not chunk:
            return summary
        last = chunk[-1][0]
        rows = [{"image_id": image_id, "model_version_id": version.id, "label": label,
                 "confidence": confidence, "threshold": trusted[label],
                 "target_precision": target_precision, "created_at": utcnow()}
                for _, image_id, label, confidence in chunk
                if image_id not in reviewed and confidence >= trusted[label]]
        with db.write() as s:
            insert_ignoring_duplicates(s, AutoAccept, rows)
        summary.accepted.update(r["label"] for r in rows)
