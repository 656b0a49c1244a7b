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
    with db.read() as s:
        preds = s.scalars(select(Prediction).where(
            Prediction.model_version_id == version.id)).all()
    rows = []
    for p in preds:
        threshold = summary.thresholds.get(p.label)
        if p.image_id in reviewed or threshold is None or p.confidence < threshold:
            continue
        rows.append({"image_id": p.image_id, "model_version_id": version.id, "label": p.label,
                     "confidence": p.confidence, "threshold": threshold,
                     "target_precision": target_precision, "created_at": utcnow()})
        summary.accepted[p.label] += 1
    with db.write() as s:
        insert_ignoring_duplicates(s, AutoAccept, rows)
    return summary
