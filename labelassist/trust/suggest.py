"""Suggest better class descriptions from reviews: the seed's lesson, automated.

"A photo of a wild animal" finds wild animals far worse than "lion / tiger / wolf / fox".
The reviews show which members a class really has: for each class, the stored embeddings
of its reviewed images (the human label is the truth) fall into a few modes; for each mode
the candidate description whose text embedding best picks it out against the other
classes' images is proposed. Nothing is re-encoded: images are stored embeddings, and
only candidate descriptions go through the text tower.

A proposal is proven before it is offered: the whole procedure (modes, ranking, the
choice between adding and replacing) runs on some folds of the reviews and is measured
on the others, and it is offered only when it gains on most folds and the reviews it
fixes outnumber those it breaks by more than luck (a one-sided sign test).

The words come from vocabulary.py, the procedure on embeddings from descriptions.py; this
module proves a proposal on held-out folds, writes it as a label file and keeps the
measurement for the report.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..db import Database
from ..db.models import ModelVersion, Suggestion
from ..labels import LabelSet
from .descriptions import Scorer, choose, sign_test
from .learn import folds_of, load_training_set

MIN_REVIEWS = 20
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



def suggest(db: Database, model, version: ModelVersion, vocabulary: list[str], *,
            policy: str = "majority") -> SuggestSummary:
    """Propose descriptions for `version`'s classes from its reviews and the vocabulary's
    words, offered only when the choice, made on some folds, gains on the others."""
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
    cur, cand, scorer = _embed_descriptions(model, current, words)
    _measure_held_out(summary, x, y, keys, classes, cur, cand, scorer)
    held_out, gains = summary.held_out, summary.held_out["folds_gaining"]
    if not (gains > len(summary.folds) / 2 and held_out["p_value"] < MAX_P):
        summary.reason = (f"no gain that holds across folds: held-out accuracy "
                          f"{summary.current_accuracy:.1%} now, {summary.proposed_accuracy:.1%} "
                          f"proposed; {gains} of {len(summary.folds)} folds gain, "
                          f"{held_out['fixed']} reviews fixed against {held_out['broken']} "
                          f"broken (one-sided sign test p = {held_out['p_value']:.2f}, "
                          f"needs < {MAX_P})")
        return summary
    lost = recall_lost(summary.recall)
    if lost:
        summary.reason = ("the proposal gains by taking recall from " + ", ".join(
            f"{c} ({summary.recall[c]['current']:.0%} -> {summary.recall[c]['proposed']:.0%})"
            for c in lost) + " on held-out reviews: a class must never lose what it had")
        return summary
    mode, _, _, additions, retired = choose(x, y, len(classes), cur, cand, scorer)
    if mode == "keep":
        summary.reason = "on all reviews together, the current descriptions do best"
        return summary
    summary.mode = mode
    summary.additions = [Addition(classes[c], words[j], covers, score)
                         for c, j, covers, score in additions]
    summary.retired = [current.descriptions()[k] for k in sorted(retired)]
    summary.proposed = _proposed_label_set(current, classes, summary)
    return summary


def recall_lost(recall: dict[str, dict]) -> list[str]:
    """The classes whose held-out recall the proposal lowers (to zero, or at all): such a
    proposal "gains" by predicting the other classes more often, which a user never
    wants (a class described by an unrelated word ends at 0% recall)."""
    return [c for c, r in recall.items() if r["proposed"] < r["current"]]


def _embed_descriptions(model, current: LabelSet, words: list[str]):
    """The current descriptions (columns and the class of each) and the candidate words,
    through the text tower with the label set's templates, and the classifier's own
    scoring rule: the only encoding suggest does."""
    from ..model.zeroshot import build_text_classifier

    text = build_text_classifier(model, current)
    cur = (text.weights.float().cpu().numpy(), text.description_class.cpu().numpy())
    cand = build_text_classifier(model, LabelSet({"candidates": tuple(words)},
                                                 current.templates)).weights
    cand = cand.float().cpu().numpy()
    scorer = Scorer(float(text.logit_scale), None if text.logit_bias is None
                    else float(text.logit_bias))
    return cur, cand, scorer


def _measure_held_out(summary: SuggestSummary, x, y, keys, classes, cur, cand, scorer) -> None:
    """Choose on all folds but one, predict the one left out, for every fold: the held-out
    accuracies, each class's recall, and the sign test on reviews fixed against broken."""
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


def _proposed_label_set(current: LabelSet, classes, summary: SuggestSummary) -> LabelSet:
    """The current label set with the chosen descriptions added or put in place, and the
    retired ones dropped; a class with no new description keeps its own in either mode."""
    new = {c: [a.description for a in summary.additions if a.cls == c] for c in classes}
    proposed = {}
    for c in classes:
        replaced = summary.mode == "replace" and new[c]
        kept = [d for d in current.classes[c] if (c, d) not in summary.retired]
        proposed[c] = tuple(new[c] if replaced else [*kept, *new[c]])
    return LabelSet(classes=proposed, templates=current.templates, model=current.model)


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
