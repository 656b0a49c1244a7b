"""The procedure suggest runs, on stored embeddings only: each class's reviewed images
fall into a few modes (spherical k-means); for each mode the candidate descriptions that
best pick it out against the other classes' images (AUC) are shortlisted; greedy forward
selection, a backward pruning pass and the retiring of hindering descriptions then choose
what to add to, or put in place of, the current descriptions. suggest.py runs it on folds
of the reviews to prove it before it is offered.
"""

from __future__ import annotations

import numpy as np

MAX_MODES = 3
PER_MODE = 3    # candidates shortlisted per mode
MAX_ADDED = 4   # descriptions added per class, at most
MIN_AUC = 0.75  # a description that cannot tell a mode from the other classes is no help


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, steps: int = 20) -> np.ndarray:
    """Cluster unit vectors by cosine; returns each row's cluster (deterministic)."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):  # k-means++ seeding on cosine distance
        far = np.clip(1 - np.max(x @ np.stack(centres).T, axis=1), 0, None)
        if far.sum() <= 0:
            break
        centres.append(x[rng.choice(len(x), p=far / far.sum())])
    c = np.stack(centres)
    for _ in range(steps):
        assign = np.argmax(x @ c.T, axis=1)
        for j in range(len(c)):
            members = x[assign == j]
            if len(members):
                mean = members.sum(0)
                c[j] = mean / (np.linalg.norm(mean) or 1)
    return np.argmax(x @ c.T, axis=1)


def auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per column: the chance that a positive scores above a negative (a tie counts half)."""
    out = np.empty(pos.shape[1])
    for j in range(pos.shape[1]):
        ordered = np.sort(neg[:, j])
        below = np.searchsorted(ordered, pos[:, j], side="left")
        at_most = np.searchsorted(ordered, pos[:, j], side="right")
        out[j] = (below.sum() + 0.5 * (at_most - below).sum()) / (len(pos) * len(neg))
    return out


def sign_test(fixed: int, broken: int) -> float:
    """One-sided exact sign test (McNemar's, exact) on paired held-out predictions: the
    chance of at least `fixed` wins out of fixed + broken if neither set were better."""
    from math import comb

    n = fixed + broken
    if n == 0:
        return 1.0
    return sum(comb(n, k) for k in range(fixed, n + 1)) / 2 ** n


class Scorer:
    """A prompt set on embeddings, by the classifier's own rule (softmax over descriptions;
    a class's probability is the sum over its descriptions)."""

    def __init__(self, scale: float, bias: float | None):
        self.scale, self.bias = scale, bias

    def probabilities(self, x: np.ndarray, columns: np.ndarray, owner: np.ndarray,
                      n_classes: int) -> np.ndarray:
        logits = self.scale * x @ columns
        if self.bias is not None:
            logits = logits + self.bias
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        per_class = np.zeros((len(x), n_classes))
        np.add.at(per_class.T, owner, p.T)
        return per_class

    def predict(self, x, columns, owner, n_classes) -> np.ndarray:
        return self.probabilities(x, columns, owner, n_classes).argmax(1)

    def fit(self, x, y, columns, owner, n_classes) -> tuple[float, float]:
        """(accuracy, mean log-probability of the human label): higher is better."""
        p = self.probabilities(x, columns, owner, n_classes)
        return float((p.argmax(1) == y).mean()), \
            float(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean())


def shortlist(x: np.ndarray, y: np.ndarray, n_classes: int, cand: np.ndarray
              ) -> list[tuple[int, int, int, float]]:
    """(class, candidate, reviewed images of its mode, AUC): for each class's modes, the
    candidates that best pick the mode out against the other classes' images."""
    found: dict[tuple[int, int], tuple[int, float]] = {}
    for c in range(n_classes):
        members, others = x[y == c], x[y != c]
        if len(members) < 2 or len(others) < 1:
            continue
        modes = spherical_kmeans(members, max(1, min(MAX_MODES, len(members) // 5)))
        for m in np.unique(modes):
            part = members[modes == m]
            score = auc(part @ cand, others @ cand)
            for j in np.argsort(-score)[:PER_MODE]:
                if score[j] >= MIN_AUC and found.get((c, int(j)), (0, 0))[0] < len(part):
                    found[(c, int(j))] = (len(part), float(score[j]))
    return [(c, j, covers, score) for (c, j), (covers, score) in found.items()]


def choose(x: np.ndarray, y: np.ndarray, n_classes: int, current: tuple[np.ndarray, np.ndarray],
           cand: np.ndarray, scorer: Scorer, modes: tuple[str, ...] = ("add", "replace")):
    """On these reviews: which shortlisted descriptions to add, and whether to add them to
    the current ones or put them in their place. Greedy forward selection on the reviews'
    fit (accuracy, then log-likelihood). When adding, a current description that the new
    ones make a hindrance is then retired. Returns (mode, columns, owners, chosen,
    retired: the indices of the current descriptions dropped)."""
    items = shortlist(x, y, n_classes, cand)
    cur_cols, cur_owner = current
    best = ("keep", cur_cols, cur_owner, [], frozenset())
    best_fit = scorer.fit(x, y, cur_cols, cur_owner, n_classes)
    for mode in modes:
        start = _best_per_class(items, n_classes) if mode == "replace" else []
        chosen, fit = _add_greedily(x, y, n_classes, scorer, mode, cur_cols, cur_owner, cand,
                                    items, start)
        chosen, fit = _prune(x, y, n_classes, scorer, mode, cur_cols, cur_owner, cand,
                             chosen, fit)
        retired, fit = _retire(x, y, n_classes, scorer, mode, cur_cols, cur_owner, cand,
                               chosen, fit)
        cols, owner = _columns(mode, cur_cols, cur_owner, cand, chosen, retired)
        if chosen and fit > best_fit:
            best, best_fit = (mode, cols, owner, chosen, retired), fit
    return best


def _best_per_class(items, n_classes):
    """Where replacing starts: each class's best shortlisted description (by AUC, then by
    the reviewed images its mode covers), so no class is left without one."""
    chosen = []
    for c in range(n_classes):
        mine = [i for i in items if i[0] == c]
        if mine:
            chosen.append(max(mine, key=lambda i: (i[3], i[2])))
    return chosen


def _add_greedily(x, y, n_classes, scorer, mode, cur_cols, cur_owner, cand, items, chosen):
    """Forward pass: add the shortlisted description that most improves the reviews' fit,
    while one improves it by more than a hair (a tie in accuracy needs a better
    log-likelihood), up to MAX_ADDED times the number of classes in all."""
    chosen = list(chosen)
    fit = scorer.fit(x, y, *_columns(mode, cur_cols, cur_owner, cand, chosen), n_classes)
    while len(chosen) < MAX_ADDED * n_classes:
        used = {j for _, j, _, _ in chosen}
        trials = [(scorer.fit(x, y, *_columns(mode, cur_cols, cur_owner, cand,
                                             chosen + [i]), n_classes), i)
                  for i in items if i[1] not in used]
        if not trials:
            break
        trial_fit, item = max(trials, key=lambda t: t[0])
        if trial_fit <= (fit[0], fit[1] + 1e-3):
            break
        chosen.append(item)
        fit = trial_fit
    return chosen, fit


def _retire(x, y, n_classes, scorer, mode, cur_cols, cur_owner, cand, chosen, fit):
    """After adding: drop a current description (one at a time, while it helps) when the
    reviews fit better without it, as a vague one does beside its class's members. A
    class never loses its last description."""
    retired: frozenset[int] = frozenset()
    if mode != "add" or not chosen:
        return retired, fit
    while True:
        trials = []
        for k in range(len(cur_owner)):
            if k in retired:
                continue
            without = retired | {k}
            _, owner = _columns(mode, cur_cols, cur_owner, cand, chosen, without)
            if not (owner == cur_owner[k]).any():
                continue
            trials.append((scorer.fit(x, y, *_columns(mode, cur_cols, cur_owner, cand, chosen,
                                                      without), n_classes), k))
        if not trials:
            return retired, fit
        trial_fit, k = max(trials, key=lambda t: t[0])
        if trial_fit <= (fit[0], fit[1] + 1e-3):
            return retired, fit
        retired, fit = retired | {k}, trial_fit


def _prune(x, y, n_classes, scorer, mode, cur_cols, cur_owner, cand, chosen, fit):
    """Backward pass: drop any chosen description that the later ones made redundant (an
    early pick that fit a quirk of the reviews, like a shape standing in for colours)."""
    dropped = True
    while dropped and len(chosen) > 1:
        dropped = False
        for item in list(chosen):
            rest = [i for i in chosen if i is not item]
            if mode == "replace" and not any(i[0] == item[0] for i in rest):
                continue  # the last description of a replaced class stays
            rest_fit = scorer.fit(x, y, *_columns(mode, cur_cols, cur_owner, cand, rest),
                                  n_classes)
            if rest_fit >= (fit[0], fit[1] - 1e-3):
                chosen, fit, dropped = rest, rest_fit, True
                break
    return chosen, fit


def _columns(mode, cur_cols, cur_owner, cand, chosen, retired=frozenset()):
    new_cols = cand[:, [j for _, j, _, _ in chosen]]
    new_owner = np.array([c for c, _, _, _ in chosen], dtype=cur_owner.dtype)
    keep = np.ones(len(cur_owner), bool) if mode == "add" else ~np.isin(cur_owner, new_owner)
    keep[list(retired)] = False
    return (np.concatenate([cur_cols[:, keep], new_cols], 1),
            np.concatenate([cur_owner[keep], new_owner]))
