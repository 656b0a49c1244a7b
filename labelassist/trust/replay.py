"""The review session, replayed from the ledger: what reviewers were shown as they went.

While people review (with `serve --learn-every N`, or `learn` by hand), each stored probe
is a new model_version made from the first R reviews. For each version of a family (the
zero-shot version at R = 0, then its probes in the order of R), this module asks two
questions of the images that were reviewed after that version existed:

- accuracy: how often was the version right on them (the human label is the truth)?
- auto-accept: with the thresholds that accept's rule (the report's --rule: risk by
  default) would have set from the first R reviews alone, what share of the images not
  yet reviewed would `accept` have taken, and how precise was that on the ones reviewed
  later? (Out-of-set flags are left aside.)

Nothing here peeks ahead: thresholds come only from reviews made before the version, and
a probe's own predictions for the reviews it learned from are out of fold. The images
reviewed later are not a random sample when reviewers work in uncertainty order (they are
the hard ones first), so the accuracy is a pessimistic view. Reported as "session".
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
from sqlalchemy import select

from .audit import TrustOptions, class_threshold
from .risk import fair_prefix, pooled_rule, takes_enough
from ..db import Database
from ..db.models import ModelVersion, Prediction, as_utc
from ..db.queries import keyset_pages
from .reviews import load_reviews

CHUNK = 20_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def review_order(reviews) -> list[int]:
    """Reviewed images in the order they were first reviewed (Label Studio's clock, then
    the annotation id)."""
    first: dict[int, tuple] = {}
    for a in reviews.raw:
        if a.image_id not in reviews.labels or a.cancelled or a.label is None:
            continue
        when = (as_utc(a.ls_created_at or a.pulled_at or _EPOCH), a.ls_annotation_id)
        if a.image_id not in first or when < first[a.image_id]:
            first[a.image_id] = when
    return sorted(first, key=first.get)


def _predictions(db: Database, version_id: int, classes: list[str]):
    """(image ids, class index, confidence) of every prediction of a version, as arrays
    read a chunk at a time."""
    ids, labels, confs = [], [], []
    index = {c: n for n, c in enumerate(classes)}
    query = select(Prediction.id, Prediction.image_id, Prediction.label,
                   Prediction.confidence).where(Prediction.model_version_id == version_id)
    for rows in keyset_pages(db, query, Prediction.id, size=CHUNK):
        ids += [r[1] for r in rows]
        labels += [index.get(r[2], -1) for r in rows]
        confs += [r[3] for r in rows]
    return (np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64),
            np.asarray(confs, dtype=np.float64))


def session_point(db: Database, version: ModelVersion, reviews_before: int, order: list[int],
                  truth: dict[int, str], trust: TrustOptions) -> dict:
    classes = list(version.label_set["classes"])
    ids, labels, confs = _predictions(db, version.id, classes)
    before = order[:reviews_before]
    later = np.isin(ids, order[reviews_before:])
    known = np.isin(ids, before)
    human = np.array([classes.index(truth[i]) if truth.get(i) in classes else -2
                      for i in ids.tolist()], dtype=np.int64)
    correct = labels == human
    unreviewed = ~known
    thresholds = _thresholds(ids, labels, confs, correct, known, classes, before, trust)
    trusted = unreviewed & (confs >= _cuts(thresholds, classes)[labels])
    checked = trusted & later
    return {
        "model_version": version.name, "kind": version.kind, "reviews": reviews_before,
        "later_reviewed": int(later.sum()),
        "accuracy_later_reviewed": float(correct[later].mean()) if later.any() else None,
        "unreviewed": int(unreviewed.sum()),
        "accept_share": float(trusted.sum() / unreviewed.sum()) if unreviewed.any() else None,
        "accept_checked": int(checked.sum()),
        "accept_precision": float(correct[checked].mean()) if checked.any() else None,
        "thresholds": thresholds,
    }


def _thresholds(ids, labels, confs, correct, known, classes, before, trust) -> dict:
    """Each class's threshold by accept's rule (trust.rule), from the reviews made so far:
    the class rule on them all; risk and bound on their fair sample (push's shuffle)."""
    if trust.rule == "class":
        return {c: class_threshold(confs[(labels == n) & known],
                                   correct[(labels == n) & known],
                                   confs[(labels == n) & ~known], trust.target_precision,
                                   trust.min_support)["threshold"]
                for n, c in enumerate(classes)}
    fair = fair_prefix(ids, np.asarray(before, dtype=np.int64))
    names = np.array(classes + ["?"], dtype=object)[labels[fair]]
    result = pooled_rule(trust.rule, confs[fair], correct[fair], names, classes,
                         trust.target_precision, level=trust.confidence,
                         min_class_reviews=trust.min_class_reviews,
                         min_taken=trust.min_taken, chosen=confs[known & ~fair],
                         others=confs[~fair])
    out = {c: result.per_class[c]["threshold"] for c in classes}
    if trust.rule == "risk":  # accept's check: under --min-taken, nothing is trusted
        taken = int(((~known) & (confs >= _cuts(out, classes)[labels])).sum())
        if not takes_enough(taken, result.selected, trust.min_taken):
            out = dict.fromkeys(classes)
    return out


def _cuts(thresholds: dict, classes: list[str]) -> np.ndarray:
    """Each class's threshold by index, inf where it has none, and inf last for a label
    outside the classes (index -1): never trusted."""
    return np.array([np.inf if thresholds[c] is None else thresholds[c] for c in classes]
                    + [np.inf])


def session_sections(db: Database, trust: TrustOptions = TrustOptions()) -> list[dict]:
    """One section per zero-shot version that probes were learned from: its points, in
    the order of the reviews they were made from. Empty when nothing was learned."""
    with db.read() as s:
        versions = s.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
    probes: dict[str, list[ModelVersion]] = {}
    for v in versions:
        if v.kind == "probe":
            probes.setdefault(v.label_set.get("probe", {}).get("base"), []).append(v)
    bases = [v for v in versions if v.name in probes]
    if not bases:
        return []
    reviews = load_reviews(db, trust.policy)
    target_precision, min_support = trust.target_precision, trust.min_support
    order = review_order(reviews)
    truth = {i: h.label for i, h in reviews.labels.items()}
    sections = []
    for base in bases:
        family = [(base, 0)] + sorted(((p, int(p.label_set["probe"]["reviews"]))
                                       for p in probes[base.name]), key=lambda t: t[1])
        points = [session_point(db, v, min(r, len(order)), order, truth, trust)
                  for v, r in family]
        sections.append({"base": base.name, "target_precision": target_precision,
                         "min_support": min_support, "rule": trust.rule,
                         "reviews": len(order), "points": points})
    return sections
