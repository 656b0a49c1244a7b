"""Out of set: images that match none of the classes (noise, a page of text, an empty
frame, a photo of something else). Real folders hold some.

Each zero-shot prediction stores its similarity: the cosine of the image to its closest
class description. The reviewed images of a class (the human label is the truth) show how
close that class's real pictures come to their closest descriptions. An image predicted
as that class (by the version at hand: a probe's label where a probe corrects zero-shot)
whose similarity falls far below theirs matches none of the classes well:

    threshold = p5 - (median - p5)     of the reference similarities

as far below the reference's 5th percentile as that lies below its median, and, where
the reference is reviews, never above the lowest of them: an image that matches its class
as well as a real picture a reviewer saw is not flagged (from a few reviews the 5th
percentile is nearly the lowest, and the rule alone flagged an eighth of a class's real
pictures in benchmarks/clean_cost.py's pairs). A reviewer's word is the truth here as in
learn and accept: junk that a reviewer names a class lowers the bar to it (reviewers answer
"other" for junk, below; Otsu's split cannot tell junk from a real picture far from its
description: the pairs' real pictures alone split 8 deviations apart in one draw of 20 in
eight). With fewer
than MIN_REFERENCE reviews of a class (before the first review, say), the reference is
the predictions of that class; when their similarities fall in two clearly separate
groups (Otsu's split, the groups' means more than SEPARATION pooled standard deviations
apart), only the upper group: the lower one is the junk to flag.

A reviewer's "other" (none of these) feeds back: the threshold rises to just above the
highest similarity of an image reviewed as "other", but never above the reference's 5th
percentile, so that about 1 real picture in 20 at most is flagged.

Flagged images are never auto-accepted, are pushed first with `push --order flagged`,
and are counted in the report.
The flag is only as good as the descriptions: with vague ones ("warm colour") the
similarities of real pictures spread too widely to tell junk from them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from sqlalchemy import and_, case, exists, false, func, or_, select
from sqlalchemy.orm import aliased

from .audit import class_confidences
from ..db import Database
from ..db.models import ModelVersion, Prediction
from ..db.queries import rows_in_chunks
from .reviews import Reviews, load_reviews

OTHER = "other"  # the reviewers' "none of these" choice in Label Studio
MIN_REFERENCE = 10  # reviews of a class before they, not all its predictions, set the bar
SEPARATION = 8.0  # toy world: junk and pictures 17 apart; pictures alone split at most 5
LOW_PERCENTILE = 5


@dataclass(frozen=True)
class ClassBar:
    threshold: float | None  # similarity below which a prediction of the class is flagged
    reference: str           # "reviews", "predictions", or "none"
    n_reference: int
    median: float | None
    low: float | None        # the reference's 5th percentile
    other_reviews: int       # images of this predicted class that reviewers called "other"


def base_version(db: Database, version: ModelVersion) -> ModelVersion:
    """The zero-shot version whose similarities apply: a probe's base, else itself."""
    name = version.label_set.get("probe", {}).get("base")
    if not name or name == version.name:
        return version
    with db.read() as s:
        return s.scalars(select(ModelVersion).where(ModelVersion.name == name)).one()


def class_bars(db: Database, version: ModelVersion, reviews: Reviews | None = None,
               base: ModelVersion | None = None) -> dict[str, ClassBar]:
    """Per class of the zero-shot base (`base`: already looked up), the similarity below
    which it flags."""
    base = base or base_version(db, version)
    reviews = load_reviews(db) if reviews is None else reviews
    classes = list(base.label_set["classes"])
    with db.read() as s:
        reviewed = rows_in_chunks(s, lambda chunk: select(
            Prediction.image_id, Prediction.label, Prediction.similarity).where(
            Prediction.model_version_id == base.id, Prediction.image_id.in_(chunk),
            Prediction.similarity.is_not(None)), list(reviews.labels))
    by_truth: dict[str, list[float]] = {c: [] for c in classes}
    others: dict[str, list[float]] = {c: [] for c in classes}
    for image_id, predicted, sim in reviewed:
        truth = reviews.labels[image_id].label
        if truth in by_truth:
            by_truth[truth].append(sim)
        elif truth == OTHER and predicted in others:
            others[predicted].append(sim)
    fallback = [c for c in classes if len(by_truth[c]) < MIN_REFERENCE]
    predicted = class_confidences(db, base.id, fallback, column=Prediction.similarity) \
        if fallback else {}
    return {c: reference_bar(by_truth[c], predicted.get(c, ()), others[c]) for c in classes}


def reference_bar(reviewed, predicted, other) -> ClassBar:
    """One class's bar: from the similarities of its reviewed pictures (`reviewed`), or,
    with fewer than MIN_REFERENCE of them, from those of its predictions (`predicted`,
    Otsu's upper group); `other`: the similarities of its images reviewed as "other"."""
    if len(reviewed) < MIN_REFERENCE:
        return _bar(upper_group(predicted), "predictions", list(other))
    return _bar(np.asarray(reviewed, dtype=np.float64), "reviews", list(other))


def upper_group(values: np.ndarray) -> np.ndarray:
    """The values above Otsu's split when the two groups are clearly apart (SEPARATION)
    and the lower one is the smaller; else all of them."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    if n < 4:
        return v
    k = np.arange(1, n)  # the lower group is v[:k]
    total, squares = np.cumsum(v), np.cumsum(v * v)
    low_mean = total[:-1] / k
    high_mean = (total[-1] - total[:-1]) / (n - k)
    between = k * (n - k) * (high_mean - low_mean) ** 2
    best = int(np.argmax(between))
    split = best + 1
    within = (squares[-1] - split * low_mean[best] ** 2
              - (n - split) * high_mean[best] ** 2) / n
    apart = (high_mean[best] - low_mean[best]) / math.sqrt(max(within, 1e-12))
    return v[split:] if apart > SEPARATION and split < n / 2 else v


def _bar(values: np.ndarray, source: str, other: list[float]) -> ClassBar:
    if len(values) == 0:
        return ClassBar(None, "none", 0, None, None, len(other))
    median = float(np.median(values))
    low = float(np.percentile(values, LOW_PERCENTILE))
    threshold = low - (median - low)
    if source == "reviews":  # real pictures of the class, by a reviewer's word
        threshold = min(threshold, float(values.min()))
    if other:  # just above every "other" image seen, but never above the 5th percentile
        threshold = max(threshold, min(math.nextafter(max(other), math.inf), low))
    return ClassBar(threshold, source, len(values), median, low, len(other))


def flagged(label: str | None, similarity: float | None, bars: dict[str, ClassBar]) -> bool:
    bar = bars.get(label)
    return bool(bar and bar.threshold is not None and similarity is not None
                and similarity < bar.threshold)


def flagged_mask(labels: np.ndarray, similarities: np.ndarray, classes: list[str],
                 bars: dict[str, ClassBar]) -> np.ndarray:
    """flagged() over arrays: each label an index into `classes` (-1: none of them),
    each similarity a float (NaN: unknown)."""
    cut = np.array([-np.inf if bars.get(c) is None or bars[c].threshold is None
                    else bars[c].threshold for c in classes] + [-np.inf])
    with np.errstate(invalid="ignore"):  # NaN is never below a bar
        return np.asarray(similarities, dtype=np.float64) < cut[np.asarray(labels)]


def flag_clause(label, similarity, bars: dict[str, ClassBar]):
    """SQL: an image is flagged, given the label a version predicts for it and its
    zero-shot similarity (two columns, or one Prediction's)."""
    terms = [and_(label == c, similarity < bar.threshold)
             for c, bar in bars.items() if bar.threshold is not None]
    return or_(*terms) if terms else false()


def flagged_first(db: Database, version: ModelVersion, bars: dict[str, ClassBar]):
    """An ORDER BY term for a query over `version`'s predictions: 0 for flagged images
    (the label the version predicts, the similarity of its zero-shot base), 1 for the
    rest."""
    base = base_version(db, version)
    if base.id == version.id:  # a zero-shot version: its own columns, no subquery a row
        return case((flag_clause(Prediction.label, Prediction.similarity, bars), 0), else_=1)
    b = aliased(Prediction)
    is_flagged = exists(select(b.id).where(
        b.image_id == Prediction.image_id, b.model_version_id == base.id,
        flag_clause(Prediction.label, b.similarity, bars)))
    return case((is_flagged, 0), else_=1)


def flagged_images(db: Database, version: ModelVersion,
                   bars: dict[str, ClassBar] | None = None) -> dict[int, float | None]:
    """image id -> similarity, for the images flagged by the label `version` predicts and
    its zero-shot base's similarity: what `predictions`, `status` and the report's
    preview show."""
    base = base_version(db, version)
    bars = class_bars(db, base) if bars is None else bars
    b = aliased(Prediction)
    with db.read() as s:
        return dict(s.execute(select(Prediction.image_id, b.similarity).join(
            b, (b.image_id == Prediction.image_id) & (b.model_version_id == base.id)).where(
            Prediction.model_version_id == version.id,
            flag_clause(Prediction.label, b.similarity, bars))).all())


def out_of_set_summary(db: Database, version: ModelVersion, reviews: Reviews | None = None
                       ) -> dict:
    """For the report: how many images are flagged, and what reviewers said of those they
    saw. The JSON's `out_of_set` section (docs/formats.md, "Report JSON")."""
    reviews = load_reviews(db) if reviews is None else reviews
    base = base_version(db, version)
    bars = class_bars(db, base, reviews)
    of_base = Prediction.model_version_id == base.id
    with db.read() as s:
        is_flagged = flag_clause(Prediction.label, Prediction.similarity, bars)
        total = s.scalar(select(func.count()).where(of_base, is_flagged))
        missing = s.scalar(select(func.count()).where(of_base, Prediction.similarity.is_(None)))
        flagged_ids = rows_in_chunks(s, lambda chunk: select(Prediction.image_id).where(
            of_base, Prediction.image_id.in_(chunk), is_flagged),
            list(reviews.labels), scalars=True)
    said = [reviews.labels[i].label for i in flagged_ids]
    other_reviews = sum(r.label == OTHER for r in reviews.labels.values())
    return {"model_version": base.name, "flagged": total,
            "flagged_reviewed": len(said), "flagged_reviewed_other": said.count(OTHER),
            "other_reviews": other_reviews, "without_similarity": missing,
            "per_class": {c: asdict(bar) for c, bar in bars.items()}}


def out_of_set_sections(db: Database, version_names: list[str], policy: str = "majority"
                        ) -> list[dict]:
    """The report's `out_of_set`: one summary per zero-shot base of the given versions."""
    reviews = load_reviews(db, policy)
    with db.read() as s:
        versions = s.scalars(select(ModelVersion).where(
            ModelVersion.name.in_(version_names)).order_by(ModelVersion.id)).all()
    bases: dict[int, ModelVersion] = {}
    for version in versions:
        base = base_version(db, version)
        bases.setdefault(base.id, base)
    return [out_of_set_summary(db, base, reviews) for base in bases.values()]
