"""Model-human agreement: how far can this model be trusted, per class, and where must
humans look? The human label (reviews.py) is the truth."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from itertools import combinations

import numpy as np
from sqlalchemy import func, select

from ..db import Database
from ..db.models import Annotation, ModelVersion, Prediction
from ..errors import ConfigError
from ..db.queries import first_paths, keyset_pages, rows_in_chunks
from .reviews import load_reviews

N_BINS = 10
DEFAULT_MIN_SUPPORT = 30
RULES = ("class", "bound", "risk")  # accept --rule (TrustOptions.rule)


# ---- metrics (checked against scikit-learn in tests) -------------------------------------

def confusion_matrix(truth: list[str], predicted: list[str], labels: list[str]) -> np.ndarray:
    """Rows = truth (human), columns = predicted (model)."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(truth, predicted):
        matrix[index[t], index[p]] += 1
    return matrix


def per_class_scores(matrix: np.ndarray, labels: list[str]) -> dict[str, dict]:
    tp = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    support = matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {label: {"precision": float(precision[i]), "recall": float(recall[i]),
                    "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)}


def cohen_kappa(matrix: np.ndarray) -> float:
    n = matrix.sum()
    if n == 0:
        return float("nan")
    observed = np.trace(matrix) / n
    expected = float((matrix.sum(axis=0) * matrix.sum(axis=1)).sum()) / n ** 2
    if expected == 1:
        return 1.0 if observed == 1 else 0.0  # one label everywhere: agreement is trivial
    return float((observed - expected) / (1 - expected))


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Equal-width bins over [0, 1] (a value on an edge joins the lower bin, as in
    scikit-learn's calibration_curve); ECE = sum of bin weight x |accuracy - confidence|."""
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.searchsorted(edges[1:-1], confidence)
    bins, ece, n = [], 0.0, len(confidence)
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        conf = float(confidence[mask].mean()) if count else None
        acc = float(correct[mask].mean()) if count else None
        if count:
            ece += count / n * abs(acc - conf)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                     "confidence": conf, "accuracy": acc})
    return {"ece": float(ece) if n else None, "bins": bins}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def class_threshold(confidence: np.ndarray, correct: np.ndarray, all_confidence: np.ndarray,
                    target: float, min_support: int) -> dict:
    """The lowest confidence t at which reviewed predictions of this class with confidence
    >= t reach `target` precision on at least `min_support` reviews. Coverage is the share
    of all this class's predictions (reviewed or not) at or above t."""
    all_confidence = np.sort(all_confidence)
    order = np.argsort(-confidence, kind="stable")
    conf, ok = confidence[order], correct[order]
    hits = np.cumsum(ok)
    counts = np.arange(1, len(conf) + 1)
    precision = hits / np.maximum(counts, 1)
    curve = [{"threshold": float(c), "precision": float(p),
              "coverage": coverage(all_confidence, c)} for c, p in zip(conf, precision)]
    best = None
    for i in range(len(conf)):
        # a threshold sits between distinct confidences: take the last of equal values
        if i + 1 < len(conf) and conf[i + 1] == conf[i]:
            continue
        if precision[i] >= target and counts[i] >= min_support:
            best = i
    result = {"threshold": None, "precision": None, "coverage": 0.0, "reviews": 0,
              "interval": None, "curve": curve}
    if best is None:
        result["reason"] = (f"no threshold reaches {target:.0%} precision on "
                            f"{min_support}+ reviews (the model predicted this class for "
                            f"{len(conf)} reviewed images)")
        return result
    t = float(conf[best])
    lo, hi = wilson_interval(int(hits[best]), int(counts[best]))
    result.update(threshold=t, precision=float(precision[best]), reviews=int(counts[best]),
                  coverage=coverage(all_confidence, t), interval=[lo, hi])
    return result


def coverage(all_confidence: np.ndarray, threshold: float) -> float:
    """The share of predictions at or above the threshold. all_confidence is sorted, so
    this is a binary search, not a pass over every prediction for each point of a curve."""
    n = len(all_confidence)
    if not n:
        return 0.0
    ties_low = np.searchsorted(all_confidence, threshold, side="left")
    return float((n - ties_low) / n)


# ---- the audit ----------------------------------------------------------------------------

@dataclass
class VersionAudit:
    model_version: str
    reviewed: int
    agreement: float | None
    accuracy: float
    cohen_kappa: float
    per_class: dict
    confusion: dict
    calibration: dict
    thresholds: dict
    disagreements: list[dict]
    annotators: dict = field(default_factory=dict)
    effort: dict = field(default_factory=dict)
    skipped: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrustOptions:
    """What a trust threshold must hold: the precision asked for, the reviews a class
    needs before it gets a threshold, and how annotators' conflicts resolve (--resolve).
    audit, accept, export --include-auto and the report's session all take one."""

    target_precision: float = 0.99
    min_support: int = DEFAULT_MIN_SUPPORT
    policy: str = "majority"
    # accept --rule: "risk", the default (one threshold for all classes by conformal
    # selection: the precision holds in expectation, where at least `min_taken` of what it
    # selects is taken, else none; each class guarded: trust/risk.py), "bound"
    # (one threshold with a finite-sample bound at `confidence`, each class guarded by
    # `min_class_reviews`) or "class" (each class's threshold from its own 30+ reviews,
    # as the audit shows: no guarantee; in benchmarks/clean_cost.py it took 96.7% right
    # where 99% was asked)
    rule: str = "risk"
    confidence: float = 0.95
    min_class_reviews: int = 10
    min_taken: float = 0.65

    def __post_init__(self) -> None:
        if not 0 < self.target_precision <= 1:
            raise ConfigError("--target-precision must be in (0, 1], e.g. 0.99")
        if self.rule not in RULES:
            raise ConfigError(f"--rule {self.rule!r}: use {', '.join(RULES[:-1])} or "
                              f"{RULES[-1]}")
        if not 0 < self.confidence < 1:
            raise ConfigError("--confidence must be in (0, 1), e.g. 0.95")
        if not 0 < self.min_taken <= 1:
            raise ConfigError("--min-taken must be in (0, 1], e.g. 0.65")


class NoReviews(ConfigError):
    """Nothing to audit yet: the report describes the predictions instead."""


def audit(db: Database, version: str | None = None,
          trust: TrustOptions = TrustOptions()) -> list[VersionAudit]:
    """One audit per model_version with reviewed predictions (or just `version`)."""
    reviews = load_reviews(db, trust.policy)
    if not reviews.labels:
        raise NoReviews("no reviewed images yet: push to Label Studio, review some tasks, "
                          "then run labelassist pull")
    with db.read() as s:
        query = select(ModelVersion).order_by(ModelVersion.id)
        if version:
            query = query.where(ModelVersion.name == version)
        versions = s.scalars(query).all()
    if version and not versions:
        raise ConfigError(f"no model_version {version!r} (see labelassist status)")
    audits = [a for v in versions
              if (a := audit_version(db, v, reviews, trust))]
    if not audits:
        raise NoReviews("none of the reviewed images has a prediction from "
                          f"{version or 'any model_version'}")
    return audits


def audit_version(db: Database, version: ModelVersion, reviews,
                  trust: TrustOptions) -> VersionAudit | None:
    target, min_support = trust.target_precision, trust.min_support
    with db.read() as s:
        preds = {p.image_id: p for p in rows_in_chunks(s, lambda chunk: select(Prediction).where(
            Prediction.model_version_id == version.id, Prediction.image_id.in_(chunk)),
            reviews.labels, scalars=True)}
        if not preds:
            return None
        paths = first_paths(s, list(preds))
        accepted = dict(s.execute(select(Annotation.accepted_prediction, func.count()).where(
            Annotation.model_version_id == version.id, Annotation.deleted_at.is_(None),
            Annotation.cancelled.is_(False)).group_by(Annotation.accepted_prediction)).all())
    ids = sorted(preds)
    human = [reviews.labels[i].label for i in ids]
    model = [preds[i].label for i in ids]
    classes = list(version.label_set["classes"])
    labels = classes + sorted(set(human) - set(classes))
    matrix = confusion_matrix(human, model, labels)
    confidence = np.array([preds[i].confidence for i in ids])
    correct = np.array([h == m for h, m in zip(human, model)])
    everything = class_confidences(db, version.id, classes)
    thresholds = {}
    for c in classes:
        mask = np.array([m == c for m in model], dtype=bool)
        thresholds[c] = class_threshold(confidence[mask], correct[mask], everything[c], target,
                                        min_support)
    n_accepted, n_corrected = accepted.get(True, 0), accepted.get(False, 0)
    disagreements = sorted(
        ({"path": paths.get(i), "predicted": preds[i].label, "human": reviews.labels[i].label,
          "confidence": preds[i].confidence, "annotators": list(reviews.labels[i].annotators)}
         for i in ids if preds[i].label != reviews.labels[i].label),
        key=lambda d: -d["confidence"])
    return VersionAudit(
        model_version=version.name, reviewed=len(ids),
        agreement=n_accepted / (n_accepted + n_corrected) if n_accepted + n_corrected else None,
        accuracy=float(correct.mean()), cohen_kappa=cohen_kappa(matrix),
        per_class=per_class_scores(matrix, labels),
        confusion={"labels": labels, "matrix": matrix.tolist()},
        calibration=calibration(confidence, correct),
        thresholds={"target_precision": target, "min_support": min_support,
                    "per_class": thresholds},
        disagreements=disagreements,
        annotators=annotator_agreement(reviews.raw),
        effort=review_effort(reviews, n_accepted, n_corrected),
        skipped=len(reviews.skipped))


def class_confidences(db: Database, version_id: int, classes: list[str],
                      chunk: int = 10_000, column=Prediction.confidence
                      ) -> dict[str, np.ndarray]:
    """Per class, the sorted confidences (or another column: outofset reads similarity) of
    all its predictions, reviewed or not, nulls left out, read a chunk at a time: 8 bytes
    a prediction, not a Python row each."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    query = select(Prediction.id, Prediction.label, column).where(
        Prediction.model_version_id == version_id, column.is_not(None))
    for rows in keyset_pages(db, query, Prediction.id, size=chunk):
        by_class: dict[str, list[float]] = {}
        for _, label, conf in rows:
            by_class.setdefault(label, []).append(conf)
        for label, values in by_class.items():
            if label in parts:
                parts[label].append(np.asarray(values, dtype=np.float64))
    return {c: np.sort(np.concatenate(p)) if p else np.zeros(0)
            for c, p in parts.items()}


def annotator_agreement(annotations: list[Annotation]) -> dict:
    """Pairwise agreement between annotators on images that several of them labelled."""
    by_image: dict[int, dict[str, str]] = {}
    for a in annotations:
        if not a.cancelled and a.label is not None:
            by_image.setdefault(a.image_id, {})[a.annotator or "?"] = a.label
    pairs = agree = 0
    shared = [labels for labels in by_image.values() if len(labels) > 1]
    for labels in shared:
        for x, y in combinations(labels.values(), 2):
            pairs += 1
            agree += x == y
    return {"images": len(shared), "pairs": pairs,
            "agreement": agree / pairs if pairs else None}


def review_effort(reviews, accepted: int, corrected: int) -> dict:
    times = sorted(h.lead_time for h in reviews.labels.values() if h.lead_time is not None)
    return {"accepted": accepted, "corrected": corrected, "skipped": len(reviews.skipped),
            "lead_time_mean": sum(times) / len(times) if times else None,
            "lead_time_median": float(np.median(times)) if times else None}
