"""Suggest better class descriptions from reviews: the seed's lesson, automated.

"A photo of a wild animal" finds wild animals far worse than "lion / tiger / wolf / fox".
The reviews show which members a class really has: for each class, the stored embeddings
of its reviewed images (the human label is the truth) fall into a few modes; for each mode
the candidate description whose text embedding best picks it out against the other
classes' images is proposed. Nothing is re-encoded: images are stored embeddings, and
only candidate descriptions go through the text tower.

A proposal is proven before it is offered: the whole procedure (modes, ranking, the
choice between adding and replacing) runs on some folds of the reviews and is measured
on the others, and it is offered only when it gains on every fold.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..labels import LabelSet
from ..db import Database
from ..db.models import ModelVersion, Suggestion
from ..errors import ConfigError
from .learn import folds_of, load_training_set

MIN_REVIEWS = 20
MAX_MODES = 3
PER_MODE = 3    # candidates shortlisted per mode
MAX_ADDED = 4   # descriptions added per class, at most
MIN_AUC = 0.75  # a description that cannot tell a mode from the other classes is no help
SUGGEST_FOLDS = 10
MAX_P = 0.05    # the held-out gain must be more than luck: a one-sided sign test


@dataclass
class Addition:
    cls: str
    description: str
    covers: int      # reviewed images of the mode it was chosen for
    auc: float       # how well it ranks the mode above the other classes' images


@dataclass
class SuggestSummary:
    version: str
    reviews: int
    vocabulary: int
    current_accuracy: float = 0.0      # on held-out folds
    proposed_accuracy: float = 0.0     # chosen on the other folds, measured on held-out
    folds: list[dict] = field(default_factory=list)
    recall: dict[str, dict] = field(default_factory=dict)  # class -> current / proposed
    held_out: dict = field(default_factory=dict)  # fixed, broken, folds_gaining, p_value
    retired: list[tuple[str, str]] = field(default_factory=list)  # (class, description)
    mode: str = "keep"                 # keep, add or replace (on all reviews)
    additions: list[Addition] = field(default_factory=list)
    proposed: LabelSet | None = None   # None: no gain that holds across folds
    reason: str = ""


# ---- vocabularies ------------------------------------------------------------------------

def load_vocabulary(spec: str | None, model_id: str) -> list[str]:
    """A file (one description a line), or a shipped vocabulary: 'imagenet' (the 1,000
    ImageNet class names, for photos) or 'toyworld'. Default: toyworld for the toy model,
    else imagenet."""
    if spec is None:
        spec = "toyworld" if Path(model_id.rstrip("/")).name.startswith("toyworld") \
            else "imagenet"
    if spec == "toyworld":
        from ..toy.world import COLOURS, SHAPES

        return [*COLOURS, *SHAPES]
    if spec == "imagenet":
        return imagenet_class_names()
    path = Path(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"--vocabulary {spec}: no such file (or use imagenet or "
                          "toyworld)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--vocabulary {spec}: cannot read it ({exc})") from None
    words = [w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#")]
    if not words:
        raise ConfigError(f"--vocabulary {spec} has no descriptions (one a line)")
    return words


def imagenet_class_names() -> list[str]:
    """The ImageNet class names that open_clip's wheel ships, read without importing it."""
    from importlib.util import find_spec

    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the imagenet vocabulary comes with open_clip_torch: "
                          "pip install --no-deps open_clip_torch, or pass --vocabulary FILE")
    source = Path(spec.submodule_search_locations[0]) / "zero_shot_metadata.py"
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "IMAGENET_CLASSNAMES"
                                                for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ConfigError(f"no IMAGENET_CLASSNAMES in {source}: pass --vocabulary FILE")


# ---- the procedure, on embeddings ------------------------------------------------------

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
        chosen: list[tuple[int, int, int, float]] = []
        if mode == "replace":  # each class starts from its best shortlisted description
            for c in range(n_classes):
                mine = [i for i in items if i[0] == c]
                if mine:
                    chosen.append(max(mine, key=lambda i: (i[3], i[2])))
        cols, owner = _columns(mode, cur_cols, cur_owner, cand, chosen)
        fit = scorer.fit(x, y, cols, owner, n_classes)
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
            cols, owner = _columns(mode, cur_cols, cur_owner, cand, chosen)
        chosen, fit = _prune(x, y, n_classes, scorer, mode, cur_cols, cur_owner, cand,
                             chosen, fit)
        retired, fit = _retire(x, y, n_classes, scorer, mode, cur_cols, cur_owner, cand,
                               chosen, fit)
        cols, owner = _columns(mode, cur_cols, cur_owner, cand, chosen, retired)
        if chosen and fit > best_fit:
            best, best_fit = (mode, cols, owner, chosen, retired), fit
    return best


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


def suggest(db: Database, model, version: ModelVersion, vocabulary: list[str], *,
            policy: str = "majority") -> SuggestSummary:
    from ..model.zeroshot import build_text_classifier

    ids, keys, x, y, classes = load_training_set(db, version, policy)
    current = LabelSet.from_json(version.label_set)
    summary = SuggestSummary(version.name, len(ids), 0)
    if len(ids) < MIN_REVIEWS or len(set(y.tolist())) < 2:
        summary.reason = (f"{len(ids)} reviewed images with stored embeddings; suggest needs "
                          f"{MIN_REVIEWS}, of at least two classes")
        return summary
    in_use = {d for _, d in current.descriptions()}
    words = list(dict.fromkeys(w for w in vocabulary if w not in in_use))
    summary.vocabulary = len(words)
    text = build_text_classifier(model, current)
    cur = (text.weights.float().cpu().numpy(), text.description_class.cpu().numpy())
    cand = build_text_classifier(model, LabelSet({"candidates": tuple(words)},
                                                 current.templates)).weights
    cand = cand.float().cpu().numpy()
    scorer = Scorer(float(text.logit_scale), None if text.logit_bias is None
                    else float(text.logit_bias))
    n = len(classes)
    fold = folds_of(keys, SUGGEST_FOLDS)
    cur_pred = scorer.predict(x, *cur, n)
    prop_pred = np.empty_like(y)
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        _, cols, owner, _, _ = choose(x[train], y[train], n, cur, cand, scorer)
        prop_pred[test] = scorer.predict(x[test], cols, owner, n)
        summary.folds.append({"fold": int(f), "reviews": int(test.sum()),
                              "current": float((cur_pred[test] == y[test]).mean()),
                              "proposed": float((prop_pred[test] == y[test]).mean())})
    summary.current_accuracy = float((cur_pred == y).mean())
    summary.proposed_accuracy = float((prop_pred == y).mean())
    summary.recall = {c: {"reviews": int((y == i).sum()),
                          "current": float((cur_pred[y == i] == i).mean()),
                          "proposed": float((prop_pred[y == i] == i).mean())}
                      for i, c in enumerate(classes) if (y == i).any()}
    gains = sum(f["proposed"] > f["current"] for f in summary.folds)
    fixed = int(((prop_pred == y) & (cur_pred != y)).sum())
    broken = int(((prop_pred != y) & (cur_pred == y)).sum())
    summary.held_out = {"fixed": fixed, "broken": broken, "folds_gaining": gains,
                        "p_value": sign_test(fixed, broken)}
    if not (gains > len(summary.folds) / 2 and summary.held_out["p_value"] < MAX_P):
        summary.reason = (f"no gain that holds across folds: held-out accuracy "
                          f"{summary.current_accuracy:.1%} now, {summary.proposed_accuracy:.1%} "
                          f"proposed; {gains} of {len(summary.folds)} folds gain, {fixed} "
                          f"reviews fixed against {broken} broken (one-sided sign test p = "
                          f"{summary.held_out['p_value']:.2f}, needs < {MAX_P})")
        return summary
    mode, _, _, additions, retired = choose(x, y, n, cur, cand, scorer)
    if mode == "keep":
        summary.reason = "on all reviews together, the current descriptions do best"
        return summary
    summary.mode = mode
    summary.additions = [Addition(classes[c], words[j], covers, score)
                         for c, j, covers, score in additions]
    summary.retired = [current.descriptions()[k] for k in sorted(retired)]
    new = {c: [a.description for a in summary.additions if a.cls == c] for c in classes}
    proposed = {}
    for c in classes:  # a class with no new description keeps its own in either mode
        replaced = mode == "replace" and new[c]
        kept = [d for d in current.classes[c] if (c, d) not in summary.retired]
        proposed[c] = tuple(new[c] if replaced else [*kept, *new[c]])
    summary.proposed = LabelSet(classes=proposed, templates=current.templates,
                                model=current.model)
    return summary


def write_proposal(summary: SuggestSummary, path: Path, model_id: str) -> None:
    """The proposed label file, in the label file's format, each addition justified."""
    s = summary
    lines = [f"# Proposed by `labelassist suggest` from {s.reviews} reviews of {s.version}.",
             f"# Held-out accuracy ({len(s.folds)} folds, chosen on the others): current "
             f"{s.current_accuracy:.1%}, proposed {s.proposed_accuracy:.1%}.",
             f"# Descriptions were {'added to' if s.mode == 'add' else 'put in place of'} "
             "the current ones. Adopt with: labelassist predict --labels " + path.name,
             *(f"# Retired {d!r} ({c}): the reviews fit better without it beside the "
               "added descriptions." for c, d in s.retired),
             f"model = {json.dumps(model_id)}",
             f"templates = {json.dumps(list(s.proposed.templates), ensure_ascii=False)}",
             "", "[classes]"]
    for cls, descriptions in s.proposed.classes.items():
        for a in (a for a in s.additions if a.cls == cls):
            lines.append(f"# {a.description!r}: picks out {a.covers} reviewed {cls} images "
                         f"from the other classes' (AUC {a.auc:.2f})")
        lines.append(f"{json.dumps(cls, ensure_ascii=False)} = "
                     f"{json.dumps(list(descriptions), ensure_ascii=False)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def store_suggestion(db: Database, version: ModelVersion, summary: SuggestSummary,
                     out: Path | None) -> None:
    """Keep what suggest measured, for the report's before and after (nothing is stored
    when there were too few reviews to measure anything)."""
    if not summary.folds:
        return
    with db.write() as s:
        s.add(Suggestion(
            model_version_id=version.id, reviews=summary.reviews,
            vocabulary=summary.vocabulary, current_accuracy=summary.current_accuracy,
            proposed_accuracy=summary.proposed_accuracy, folds=summary.folds,
            recall=summary.recall, mode=summary.mode,
            additions=[asdict(a) for a in summary.additions],
            retired=[list(r) for r in summary.retired], held_out=summary.held_out,
            proposed=None if summary.proposed is None else summary.proposed.to_json(),
            reason=summary.reason, out_path=None if out is None else str(out)))


def suggestion_sections(db: Database) -> list[dict]:
    """The newest suggestion of each zero-shot version, and whether it was adopted: a
    zero-shot version with exactly the proposed descriptions, and its audited accuracy
    on the reviewed images when it has one."""
    from sqlalchemy import select

    with db.read() as s:
        rows = s.execute(select(Suggestion, ModelVersion.name)
                         .join(ModelVersion, ModelVersion.id == Suggestion.model_version_id)
                         .order_by(Suggestion.id)).all()
        zero_shot = {json.dumps(v.label_set.get("classes"), sort_keys=True): v.name
                     for v in s.scalars(select(ModelVersion).where(
                         ModelVersion.kind == "zeroshot").order_by(ModelVersion.id))}
    newest = {}
    for row, name in rows:
        newest[name] = row
    sections = []
    for name, row in newest.items():
        proposed = row.proposed or {}
        adopted = zero_shot.get(json.dumps(proposed.get("classes"), sort_keys=True)) \
            if row.proposed else None
        sections.append({
            "model_version": name, "reviews": row.reviews, "vocabulary": row.vocabulary,
            "current_accuracy": row.current_accuracy,
            "proposed_accuracy": row.proposed_accuracy, "folds": row.folds,
            "recall": row.recall, "mode": row.mode, "additions": row.additions,
            "retired": row.retired, "held_out": row.held_out,
            "proposed": row.proposed, "reason": row.reason, "out_path": row.out_path,
            "adopted_as": adopted,
            "created_at": row.created_at.isoformat(timespec="seconds")})
    return sections

