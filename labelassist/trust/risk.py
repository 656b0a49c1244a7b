"""One trust threshold for all classes together, with a finite-sample guarantee.

The audit's rule (audit.class_threshold) asks each class for 30 reviews at the target
precision: 24 classes need 720 reviews before `accept` takes anything in all of them, and
30 right answers prove little (30 of 30 is as likely at 95% precision as at 99%). This
rule is learn-then-test (Angelopoulos, Bates et al., 2021) on the version's own confidence:

- the hypotheses: for each threshold t, from the highest to the lowest, "among all of the
  version's predictions at or above t, more than 1 - target are wrong";
- the test: the reviewed predictions at or above t are a fair sample of them (push's
  random order), so their errors are binomial; the hypothesis falls when the one-sided
  Clopper-Pearson upper bound on the error rate, at the asked confidence, is at most
  1 - target (the exact binomial tail: the p-value is P(X <= errors | n, 1 - target));
- fixed-sequence testing: thresholds are tried from high to low and the first that fails
  ends the walk, so the threshold chosen holds at the asked confidence with no correction
  for the number tried. A walk starts where a set number of errors could pass (known
  before any label is read: 0 errors need 299 reviews at 99% and 95% confidence). Two
  walks run, from 0 errors and from 1, each at half the risk (Bonferroni): one confidently
  wrong review near the top does not end everything. The lowest threshold either reaches
  is taken. The order depends on the confidences only, never on the human labels.

The fair sample is the longest run at the start of push's fair shuffle whose every image
has a human label (fair_prefix): tasks reviewed in push's order. Reviews beyond it were
chosen (uncertainty order, the Data Manager sorted by score): at worst every error above a
threshold outside the fair sample lies among the images still unreviewed, so the error
rate allowed there shrinks by the share of them that nobody reviewed.

So, with probability at least `confidence` over the reviews drawn, the precision of
everything taken at or above the threshold is at least the target, however many classes
there are.

A pooled bound can hide one bad class among many good ones (a class that is 1% of the
predictions can be all wrong under a 99% pooled precision). Each class is therefore
guarded: its reviewed predictions at or above the threshold must number at least
`min_class_reviews` (else nothing is known of it), and their errors must not show it to be
worse than the target (refused when P(X >= errors | n, 1 - target) < 1 - confidence). A
refused class gets no threshold, with its reason; the others keep the pooled one. The
threshold itself is not tested again without the refused class: a class shown to be worse
than the pool only makes the rest better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import aliased

from ..db import Database
from ..db.models import ModelVersion, Prediction
from ..db.queries import keyset_pages
from .outofset import OTHER, base_version, class_bars, flagged_mask

DEFAULT_CONFIDENCE = 0.95
DEFAULT_MIN_CLASS_REVIEWS = 10
# --rule risk: accept takes at least this share of what conformal selection selects (the
# rest: out of set, guarded classes, reviewed), or nothing; the selection's level is
# (1 - target) times it. Where nearly all of the selection is taken, the expected error
# share is then about two thirds of 1 - target, which leaves room for chance: in
# benchmarks/clean_cost.py, at 0.9 one run took 97.8% right where 99% was asked; at 0.65
# the lowest was 99.0%.
DEFAULT_MIN_TAKEN = 0.65
# The walks, each from where this many errors could pass: one from 0 (the fewest reviews:
# 299 at 99% and 95%, with the confidence split over the two walks: 368), one from 1 (one
# confidently wrong review among the first 368 does not end everything).
WALK_ALLOWANCES = (0, 1)
# push --order random's fair shuffle: Knuth's multiplicative hash of the image id, mod 2^32
# (labelstudio/push.py ORDERS["random"]; tests/test_risk.py checks that the two agree).
SHUFFLE_MULTIPLIER = 2654435761


# ---- the exact binomial tail (checked against scipy in tests) -----------------------------

def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact for any n)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0:
        return 1.0
    return 0.0 if p >= 1 else _tail(0, k, n, p)


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed itself (1 - cdf loses the small ones)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    return 1.0 if p >= 1 else _tail(k, n, n, p)


def _tail(lo: int, hi: int, n: int, p: float) -> float:
    """The sum of the binomial pmf from lo to hi."""
    i = np.arange(lo, hi + 1, dtype=np.float64)
    lgamma = np.frompyfunc(math.lgamma, 1, 1)
    log_pmf = (math.lgamma(n + 1) - lgamma(i + 1).astype(np.float64)
               - lgamma(n - i + 1).astype(np.float64) + i * math.log(p)
               + (n - i) * math.log1p(-p))
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def clopper_pearson_upper(errors: int, n: int, confidence: float) -> float:
    """The one-sided upper confidence bound on a binomial rate: the p at which seeing at
    most `errors` in `n` has probability 1 - confidence (1.0 when nothing is known)."""
    if n == 0 or errors >= n:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: binom_cdf falls as p rises
        mid = (lo + hi) / 2
        if binom_cdf(errors, n, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def reviews_needed(target: float, confidence: float) -> int:
    """The fewest reviews above a threshold that can prove `target` precision at
    `confidence`: all of them right, and (target)^n <= 1 - confidence."""
    if target >= 1:
        raise ValueError("no finite number of reviews proves 100% precision")
    return math.ceil(math.log(1 - confidence) / math.log(target) - 1e-12)


# ---- the rule -------------------------------------------------------------------------------

@dataclass
class PooledThreshold:
    """The threshold for all classes (None with `reason` when the bound cannot be met),
    the reviews and errors it rests on, the bound on the error rate at or above it, and
    per class its threshold (the pooled one, or None when guarded out) and reason."""

    threshold: float | None
    reviews: int
    errors: int
    error_bound: float | None
    per_class: dict[str, dict] = field(default_factory=dict)
    reason: str | None = None
    others: int = 0  # the version's predictions outside the fair sample
    selected: int = 0  # --rule risk: those of them at or above the threshold


def pooled_threshold(confidence: np.ndarray, correct: np.ndarray, predicted: np.ndarray,
                     classes: list[str], target: float,
                     level: float = DEFAULT_CONFIDENCE,
                     min_class_reviews: int = DEFAULT_MIN_CLASS_REVIEWS,
                     chosen: np.ndarray | None = None,
                     others: np.ndarray | None = None,
                     allowances: tuple[int, ...] = WALK_ALLOWANCES) -> PooledThreshold:
    """The lowest threshold t on the fair sample's confidence (`predicted`: their class
    names, `correct`: whether the human agreed) at which learn-then-test proves `target`
    precision at confidence `level` on what accept takes, then each class's guard at t.

    `others`: the confidences of every image outside the fair sample, and `chosen`: those
    of them that were reviewed anyway (picked by the model: uncertainty order). Accept
    takes the others at or above t that nobody reviewed; at worst every error above t
    among the others is among them, so the bound must hold at 1 - target scaled by
    (taken / others above t). With no chosen reviews the scale is 1."""
    if target >= 1:
        return _refused(classes, "no finite number of reviews proves 100% precision: "
                        "pass --target-precision below 1")
    others = np.sort(np.asarray(others if others is not None else [], dtype=np.float64))
    chosen = np.sort(np.asarray(chosen if chosen is not None else [], dtype=np.float64))

    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
    conf = np.asarray(confidence, dtype=np.float64)[order]
    errors = np.cumsum(~np.asarray(correct, dtype=bool)[order])
    n = np.arange(1, len(conf) + 1)
    # the error rate allowed above each threshold: 1 - target, scaled by the share of the
    # others above it that accept would take (1 when no review was chosen by the model)
    above = len(others) - np.searchsorted(others, conf, side="left")
    picked = len(chosen) - np.searchsorted(chosen, conf, side="left")
    alpha = (1 - target) * np.where(above > 0, (above - picked) / np.maximum(above, 1), 1.0)
    each = 1 - (1 - level) / len(allowances)  # Bonferroni over the walks
    walks = [_walk(conf, errors, alpha, each, allowed) for allowed in allowances]
    best = max((w[0] for w in walks if w[0] is not None), default=None)
    if best is None:
        tested = walks[0][1]
        return _refused(classes, _no_threshold(
            len(conf), None if tested is None else (int(n[tested]), int(errors[tested])),
            reviews_needed(target, each), target, level))
    t = float(conf[best])
    result = PooledThreshold(t, int(n[best]), int(errors[best]),
                             clopper_pearson_upper(int(errors[best]), int(n[best]), each),
                             others=len(others))
    return _guarded(result, confidence, correct, predicted, classes, target, level,
                    min_class_reviews)


def _guarded(result: PooledThreshold, confidence, correct, predicted, classes: list[str],
             target: float, level: float, min_class_reviews: int) -> PooledThreshold:
    """The pooled threshold with each class's guard (class_guard) at it."""
    above = np.asarray(confidence, dtype=np.float64) >= result.threshold
    wrong = ~np.asarray(correct, dtype=bool)
    for c in classes:
        mine = above & (np.asarray(predicted) == c)
        result.per_class[c] = class_guard(int(mine.sum()), int((mine & wrong).sum()),
                                          result.threshold, target, level, min_class_reviews)
    return result


def _walk(conf: np.ndarray, errors: np.ndarray, alpha: np.ndarray, level: float,
          allowed: int) -> tuple[int | None, int | None]:
    """One fixed-sequence walk down the sorted confidences: it starts at the first
    threshold where `allowed` errors could pass (known before any label is read) and
    stops at the first that fails. (last index passed, first index tested)"""
    best = tested = None
    for i in range(len(conf)):
        if i + 1 < len(conf) and conf[i + 1] == conf[i]:
            continue  # a threshold sits between distinct confidences: the last of ties
        if tested is None and binom_cdf(allowed, i + 1, alpha[i]) > 1 - level:
            continue  # not a step of this walk yet
        tested = i if tested is None else tested
        if binom_cdf(int(errors[i]), i + 1, alpha[i]) > 1 - level:
            break  # fixed sequence: the first hypothesis kept ends the walk
        best = i
    return best, tested


def class_guard(n: int, errors: int, threshold: float, target: float, level: float,
                min_class_reviews: int) -> dict:
    """A class keeps the pooled threshold unless too few of its predictions above it were
    reviewed, or their errors show it worse than the target."""
    out = {"threshold": threshold, "reviews": n, "errors": errors, "reason": None}
    if n < min_class_reviews:
        out.update(threshold=None, reason=(
            f"{n} reviewed predictions of this class at or above the pooled threshold "
            f"{threshold:.3f}; it needs {min_class_reviews} (--min-class-reviews) before "
            "the pooled bound may speak for it"))
    elif binom_sf(errors, n, 1 - target) < 1 - level:
        out.update(threshold=None, reason=(
            f"{errors} of its {n} reviewed predictions at or above the pooled threshold "
            f"{threshold:.3f} are wrong: surely worse than {target:.0%} precision, so "
            "the pooled bound does not speak for it"))
    return out


def _refused(classes: list[str], reason: str) -> PooledThreshold:
    return PooledThreshold(None, 0, 0, None, {
        c: {"threshold": None, "reviews": 0, "errors": 0, "reason": reason}
        for c in classes}, reason)


def _no_threshold(reviews: int, first: tuple[int, int] | None, needed: int, target: float,
                  level: float) -> str:
    if first is None:
        return (f"{reviews} reviewed predictions in the fair sample; proving {target:.0%} "
                f"precision at {level:.0%} confidence needs at least {needed}, all right, "
                "at or above a threshold (review more tasks in push's order)")
    n, errors = first
    return (f"the {n} most confident reviewed predictions of the fair sample hold {errors} "
            f"errors: too many to prove {target:.0%} precision at {level:.0%} confidence "
            "(review more, or learn a better probe)")


# ---- conformal selection: the precision taken, in expectation -------------------------------

def risk_reviews_needed(target: float, min_taken: float) -> int:
    """The fewest fair reviews with which conformal selection can take anything: all of
    them right above the threshold, and 1 / (n + 1) <= (1 - target) * min_taken (153 at
    99% and 0.65)."""
    return math.ceil(1 / ((1 - target) * min_taken) - 1 - 1e-9)


def risk_threshold(confidence: np.ndarray, correct: np.ndarray, predicted: np.ndarray,
                   classes: list[str], target: float, others: np.ndarray,
                   min_taken: float = DEFAULT_MIN_TAKEN,
                   min_class_reviews: int = DEFAULT_MIN_CLASS_REVIEWS,
                   level: float = DEFAULT_CONFIDENCE) -> PooledThreshold:
    """The lowest threshold t by conformal selection (Jin & Candes, "Selection by
    prediction with conformal p-values", JMLR 2023): the fair sample (`confidence`,
    `correct`: whether the human agreed, `predicted`: the class names) calibrates, the
    images outside it (`others`: their confidences) are selected, then each class's guard
    at t.

    Each image j outside the fair sample gets the conformal p-value of "its prediction is
    wrong": p_j = (1 + the fair sample's wrong predictions at or above its confidence) /
    (n + 1). Benjamini-Hochberg at level q = (1 - target) x min_taken over the m others
    selects the k most confident, for the largest k with p <= q k / m: all others at or
    above the lowest t where (1 + errors of the fair sample at or above t) / (n + 1) <=
    q x (others at or above t) / m. Over the draw of the fair sample, the expected share
    of wrong predictions among those selected is then at most q (their FDR).

    accept takes the selected images that nobody reviewed, that are not out of set and
    whose class its guard lets through, and only where that is at least min_taken of the
    selection (takes_enough): the errors taken are at most the errors selected, so their
    expected share of what is taken is at most q / min_taken = 1 - target. Its price: n >=
    1 / q - 1 fair reviews, all right at or above t (153 at 99% and 0.65), against the 368
    of a bound that holds at 95% confidence (pooled_threshold); and it takes more as it
    selects more, where a budget fixed before the selection must assume the least."""
    if target >= 1:
        return _refused(classes, "no finite number of reviews proves 100% precision: "
                        "pass --target-precision below 1")
    n, needed = len(confidence), risk_reviews_needed(target, min_taken)
    others = np.sort(np.asarray(others, dtype=np.float64))[::-1]
    m = len(others)
    if m == 0:
        return _refused(classes, "every image is in the fair sample: nothing is left to take")
    if n < needed:
        return _refused(classes, (
            f"{n} reviewed predictions in the fair sample; conformal selection at "
            f"{target:.0%} precision, taking at least {min_taken:.0%} of what it selects "
            f"(--min-taken), needs at least {needed}, all right at or above a threshold "
            "(review more tasks in push's order)"))
    q = (1 - target) * min_taken
    wrong = np.sort(np.asarray(confidence, dtype=np.float64)[
        ~np.asarray(correct, dtype=bool)])
    last = np.r_[others[1:] != others[:-1], True]  # a threshold sits at the last of ties
    k = np.flatnonzero(last) + 1  # the others at or above each candidate threshold
    t = others[k - 1]
    errors = len(wrong) - np.searchsorted(wrong, t, side="left")  # fair ones at or above
    fdr = (1 + errors) / (n + 1) * m / k  # the estimated share wrong among those selected
    passed = np.flatnonzero(fdr <= q + 1e-12)
    if len(passed) == 0:
        best = int(np.argmin(fdr))
        return _refused(classes, (
            f"no threshold selects enough at {target:.0%} precision: at best "
            f"{float(t[best]):.3f}, which selects {int(k[best]):,} of the {m:,} images "
            f"outside the fair sample, where {int(errors[best])} of the {n} fair reviews at "
            "or above it are wrong (review more in push's order, or learn a better probe)"))
    best = int(passed[-1])  # step-up: the largest selection that passes
    result = PooledThreshold(float(t[best]), n, int(errors[best]), float(fdr[best]),
                             others=m, selected=int(k[best]))
    return _guarded(result, confidence, correct, predicted, classes, target, level,
                    min_class_reviews)


def takes_enough(taken: int, selected: int, min_taken: float) -> bool:
    """--rule risk: the expected precision holds only where what accept really takes is at
    least min_taken of what conformal selection selected."""
    return taken >= min_taken * selected


def pooled_rule(rule: str, confidence: np.ndarray, correct: np.ndarray,
                predicted: np.ndarray, classes: list[str], target: float, *, level: float,
                min_class_reviews: int, min_taken: float, chosen: np.ndarray,
                others: np.ndarray) -> PooledThreshold:
    """accept's pooled rules on a fair sample (its confidences, whether the human agreed,
    the class names predicted): "risk" (risk_threshold) or "bound" (pooled_threshold).
    `others`: the confidences outside the fair sample, `chosen`: those reviewed anyway."""
    if rule == "risk":
        return risk_threshold(confidence, correct, predicted, classes, target, others,
                              min_taken, min_class_reviews, level)
    return pooled_threshold(confidence, correct, predicted, classes, target, level,
                            min_class_reviews, chosen=chosen, others=others)


# ---- the fair sample, and the rule on a version's predictions -----------------------------

def shuffle_rank(image_ids: np.ndarray) -> np.ndarray:
    """Each image's place in push's fair shuffle (ties, impossible below 2^32 ids, go to
    the lower id, as in push)."""
    ids = np.asarray(image_ids, dtype=np.uint64)
    return (ids * np.uint64(SHUFFLE_MULTIPLIER)) % np.uint64(1 << 32)


def fair_prefix(image_ids: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Which images are the fair sample: the longest run at the start of push's fair
    shuffle whose every image has a human label. Tasks reviewed in push's order (the
    default) are all of it; reviews the model chose (uncertainty order, the Data Manager
    sorted by score) lie beyond the first image left out, and a skipped image ends it."""
    ids = np.asarray(image_ids, dtype=np.int64)
    order = np.lexsort((ids, shuffle_rank(ids)))
    done = np.isin(ids[order], labelled)
    k = len(done) if done.all() else int(np.argmin(done))
    fair = np.zeros(len(ids), dtype=bool)
    fair[order[:k]] = True
    return fair


def bound_thresholds(db: Database, version: ModelVersion, reviews, target: float,
                     level: float = DEFAULT_CONFIDENCE,
                     min_class_reviews: int = DEFAULT_MIN_CLASS_REVIEWS, *,
                     rule: str = "bound",
                     min_taken: float = DEFAULT_MIN_TAKEN,
                     base: ModelVersion | None = None,
                     bars: dict | None = None) -> PooledThreshold:
    """The pooled threshold of a version's predictions, from the fair sample of its
    reviews (reviews.py's resolved labels are the truth; "other" is an error): rule
    "bound" holds at confidence `level` (pooled_threshold), "risk" in expectation
    (risk_threshold).

    Images out of set are never taken, so the rule calibrates on the fair sample's images
    that are not, and selects among the others that are not: a junk picture that the
    model named with confidence, and a reviewer corrected, then holds back nothing that
    accept could take. The two sides must be judged alike, so the bars here (outofset.
    class_bars, by the similarities of the zero-shot version `base`) are set without the
    fair sample's "other" answers: each would raise its class's bar to just above itself,
    and so drop from the calibration exactly the error it records, while junk a little
    closer to the class, unreviewed, stays unflagged. (accept still leaves out what the
    bars with every answer flag: fewer taken, never more.) `bars`: those accept set from
    all the reviews, used as they are where the fair sample holds no "other" answer."""
    classes = list(version.label_set["classes"])
    index = {c: n for n, c in enumerate(classes)}
    base = base or base_version(db, version)
    parts = []  # a page at a time into arrays: 32 bytes a prediction, not a Python row
    zero_shot = aliased(Prediction)
    query = (select(Prediction.id, Prediction.image_id, Prediction.label,
                    Prediction.confidence, zero_shot.similarity)
             .outerjoin(zero_shot, (zero_shot.image_id == Prediction.image_id)
                        & (zero_shot.model_version_id == base.id))
             .where(Prediction.model_version_id == version.id))
    for rows in keyset_pages(db, query, Prediction.id, size=20_000):
        parts.append((np.fromiter((r[1] for r in rows), np.int64, len(rows)),
                      np.fromiter((index.get(r[2], -1) for r in rows), np.int64, len(rows)),
                      np.fromiter((r[3] for r in rows), np.float64, len(rows)),
                      np.fromiter((np.nan if r[4] is None else r[4] for r in rows),
                                  np.float64, len(rows))))
    ids, labels, confs, sims = (np.concatenate([p[k] for p in parts]) if parts
                                else np.zeros(0, dtype) for k, dtype in
                                enumerate((np.int64, np.int64, np.float64, np.float64)))
    labelled = np.fromiter(reviews.labels, dtype=np.int64, count=len(reviews.labels))
    fair = fair_prefix(ids, labelled)
    in_fair = set(ids[fair].tolist())
    unmoved = {i: h for i, h in reviews.labels.items()
               if not (h.label == OTHER and i in in_fair)}
    if bars is None or len(unmoved) < len(reviews.labels):  # the bars moved: set them again
        bars = class_bars(db, version, replace(reviews, labels=unmoved), base)
    odd = flagged_mask(labels, sims, classes, bars)
    reviewed = np.isin(ids, labelled)
    calibrate, others = fair & ~odd, ~fair & ~odd
    human = np.array([index.get(reviews.labels[i].label, -2)
                      for i in ids[calibrate].tolist()], dtype=np.int64)
    names = np.array(classes + ["?"], dtype=object)[labels[calibrate]]
    return pooled_rule(rule, confs[calibrate], labels[calibrate] == human, names, classes,
                       target, level=level, min_class_reviews=min_class_reviews,
                       min_taken=min_taken, chosen=confs[reviewed & others],
                       others=confs[others])
