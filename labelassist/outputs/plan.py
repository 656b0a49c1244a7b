"""What decides each exported image's row: the reviews (by the export's --resolve policy),
the version, and, with --include-auto, the trust thresholds audited from those same
reviews and the out-of-set bars."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from ..db import Database
from ..db.models import ModelVersion
from ..trust.audit import TrustOptions
from ..trust.outofset import OTHER, base_version, class_bars
from ..trust.reviews import load_reviews


@dataclass(frozen=True)
class Plan:
    """What decides each image's row: the reviews, the version and the trust thresholds."""
    version_id: int
    version_name: str
    version_names: dict[int, str]
    reviews: object  # reviews.Reviews
    thresholds: dict[str, float] | None  # None: unreviewed predictions stay out
    labels: frozenset[str]
    base_id: int  # the zero-shot version whose similarities flag images out of set
    bars: dict  # outofset.class_bars: flagged images are never exported as "auto"


def plan_export(db: Database, *, include_auto: bool, version: str | None,
                trust: TrustOptions, allow_biased_sample: bool = False) -> Plan:
    from ..db.queries import resolve_version

    reviews = load_reviews(db, trust.policy)
    chosen = resolve_version(db, version)
    zero_shot = base_version(db, chosen)  # looked up once
    # before anything is written: the thresholds (the class rule refuses a biased sample)
    thresholds, bars = trust_thresholds(db, chosen, reviews, trust, allow_biased_sample,
                                        zero_shot) if include_auto else (None, {})
    with db.read() as s:
        versions = s.execute(select(ModelVersion.id, ModelVersion.name,
                                    ModelVersion.label_set)).all()
    classes = {c for _, _, label_set in versions for c in label_set.get("classes", [])}
    labels = frozenset(classes | {h.label for h in reviews.labels.values()
                                  if h.label != OTHER or OTHER in classes})
    return Plan(chosen.id, chosen.name, {i: name for i, name, _ in versions}, reviews,
                 thresholds, labels, zero_shot.id, bars)


def trust_thresholds(db: Database, version: ModelVersion, reviews, trust: TrustOptions,
                     allow_biased_sample: bool = False,
                     zero_shot: ModelVersion | None = None
                     ) -> tuple[dict[str, float], dict]:
    """Per class, the confidence above which unreviewed predictions are trusted, by
    accept's rule (trust.rule), from the reviews as this export resolves them (its
    --resolve policy); and the out-of-set bars the rule set on the way (class_bars)."""
    from ..trust.accept import NothingReviewed, rule_thresholds

    try:
        summary, take = rule_thresholds(db, version, reviews, trust,
                                        allow_biased_sample=allow_biased_sample,
                                        zero_shot=zero_shot)
    except NothingReviewed:  # nothing reviewed yet: no threshold can be trusted
        return {}, class_bars(db, version, reviews, zero_shot)
    return {c: t for c, t in summary.thresholds.items() if t is not None}, take.bars
