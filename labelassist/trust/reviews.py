"""The human truth: one label per reviewed image, from however many annotations it has.

Policy "majority" (the default): the label most annotators gave; a tie goes to the most
recently updated annotation among the tied labels. Policy "latest": the most recently
updated annotation wins. Deleted annotations never count; skipped (cancelled) ones are
not labels, and an image whose every annotation was skipped counts as skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import select

from ..db import Database
from ..db.models import Annotation, as_utc
from ..errors import ConfigError

POLICIES = ("majority", "latest")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class HumanLabel:
    image_id: int
    label: str
    annotators: tuple[str, ...]
    votes: int          # annotations behind the chosen label
    annotations: int    # all label-giving annotations of the image
    lead_time: float | None


@dataclass(frozen=True)
class Reviews:
    labels: dict[int, HumanLabel]
    skipped: set[int]
    raw: list[Annotation]


def load_reviews(db: Database, policy: str = "majority") -> Reviews:
    if policy not in POLICIES:
        raise ConfigError(f"--resolve {policy!r}: use majority or latest")
    with db.read() as s:
        rows = s.scalars(select(Annotation).where(Annotation.deleted_at.is_(None))
                         .order_by(Annotation.image_id, Annotation.id)).all()
    by_image: dict[int, list[Annotation]] = {}
    for row in rows:
        by_image.setdefault(row.image_id, []).append(row)
    labels, skipped = {}, set()
    for image_id, rows_of_image in by_image.items():
        given = [a for a in rows_of_image if not a.cancelled and a.label is not None]
        if not given:
            skipped.add(image_id)
            continue
        labels[image_id] = resolve(image_id, given, policy)
    return Reviews(labels, skipped, rows)


def _when(a: Annotation) -> tuple:
    stamp = a.ls_updated_at or a.ls_created_at or _EPOCH
    return (as_utc(stamp), a.ls_annotation_id)


def resolve(image_id: int, given: list[Annotation], policy: str) -> HumanLabel:
    newest_first = sorted(given, key=_when, reverse=True)
    if policy == "latest":
        label = newest_first[0].label
    else:
        votes = Counter(a.label for a in given)
        top = max(votes.values())
        tied = {lab for lab, n in votes.items() if n == top}
        label = next(a.label for a in newest_first if a.label in tied)
    chosen = [a for a in given if a.label == label]
    times = [a.lead_time for a in given if a.lead_time is not None]
    return HumanLabel(image_id, label, tuple(sorted({a.annotator or "?" for a in chosen})),
                      len(chosen), len(given), sum(times) / len(times) if times else None)
