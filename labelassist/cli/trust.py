"""Verbs that learn from the reviews and decide what to trust: learn, suggest, accept."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..labels import DEFAULT_DB
from . import DbOpt, ModelOpt, VersionOpt, command, model_source, open_db

ResolveBriefOpt = Annotated[str, typer.Option(help="majority or latest (see report).")]


def zero_shot_version(database, version):
    """The zero-shot model_version that --version names (default: the one the newest
    work is based on)."""
    from ..db.queries import resolve_zero_shot

    return resolve_zero_shot(database, version)


@command()
def learn(
    db: DbOpt = DEFAULT_DB,
    version: Annotated[Optional[str], typer.Option(
        help="Zero-shot model_version to improve (default: the newest, or the one the "
        "newest probe was learned from).")]
    = None,
    model: ModelOpt = None,
    resolve: ResolveBriefOpt = "majority",
    store: Annotated[bool, typer.Option(help="Store the probe's predictions when it beats "
                                        "zero-shot.")] = True,
) -> None:
    """Fit a linear probe on the stored embeddings of reviewed images, anchored to the
    zero-shot classifier so it is never worse with few reviews. Its accuracy is estimated
    by cross-validation next to zero-shot's on the same reviews; when it wins, its
    predictions for every unreviewed image are stored as a new model_version
    (probe@<hash>), ready to push. Runs in seconds: nothing is decoded or encoded.

    Example: labelassist learn && labelassist push --version probe@1a2b3c4d
    """
    from ..trust.learn import learn as run_learn
    from ..model.load import load_model

    database = open_db(db)
    base = zero_shot_version(database, version)
    loaded = load_model(model_source(model) if model else base.model_id, device="cpu",
                        dtype="fp32")
    print_learn_summary(run_learn(database, loaded, base, policy=resolve, store=store), store)


def print_learn_summary(s, store: bool) -> None:
    out = Console(highlight=False, soft_wrap=True)
    chosen = "zero-shot kept: no probe beat it" if s.chosen_lambda is None \
        else f"lambda {s.chosen_lambda:g}"
    out.print(f"{s.base_version}: {s.reviews:,} reviews; cross-validated accuracy: zero-shot "
              f"{s.zero_shot_accuracy:.1%}, probe {s.probe_accuracy:.1%} ({chosen}); "
              f"temperature {s.temperature:.2f}, ECE {s.ece_before:.3f} -> {s.ece_after:.3f}",
              markup=False)
    if s.stored_version:
        out.print(f"{s.stored_version} holds {s.version_predictions:,} predictions "
                  f"({s.reviews:,} reviewed images out of fold, the rest by the probe fit on "
                  f"all reviews): labelassist push sends it", markup=False)
    elif not store:
        out.print("--no-store: nothing stored", markup=False)
    else:
        out.print("the probe does not beat zero-shot on held-out reviews: nothing stored",
                  markup=False)
    if s.label_issues:
        out.print(f"{len(s.label_issues)} human labels worth a second look (see report)",
                  markup=False)


@command()
def suggest(
    db: DbOpt = DEFAULT_DB,
    version: Annotated[Optional[str], typer.Option(
        help="Zero-shot model_version whose descriptions to improve (default: the newest, "
        "or the one the newest probe was learned from).")] = None,
    vocabulary: Annotated[Optional[str], typer.Option(
        help="Candidate descriptions: a file with one a line, or a shipped one: imagenet "
        "(the 1,000 ImageNet class names) or toyworld. Default: toyworld for the toy "
        "model, else imagenet. The current descriptions are always candidates too.")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the proposed label file (an "
                                      "existing file is kept unless --force).")] =
    Path("proposed.toml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")]
    = False,
    model: ModelOpt = None,
    resolve: ResolveBriefOpt = "majority",
) -> None:
    """Propose better class descriptions from the reviews, and prove them first.

    For each class, the stored embeddings of its reviewed images fall into a few modes;
    for each mode, the candidate description that best picks it out against the other
    classes' images is proposed (the seed's lesson: a class described by its members
    beats a vague description). The whole procedure is cross-validated on the reviews,
    and a label file is written only when it gains on every fold. Nothing is re-encoded.

    Example: labelassist suggest --vocabulary words.txt  (then: predict --labels proposed.toml)
    """
    from ..errors import ConfigError
    from ..model.load import load_model
    from ..trust.suggest import store_suggestion, write_proposal
    from ..trust.suggest import suggest as run_suggest
    from ..trust.vocabulary import load_vocabulary

    if out.exists() and not force:  # refused before minutes of work, and before a write
        raise ConfigError(f"{out} exists (a label file of yours?): pass another --out, or "
                          "--force to overwrite it")
    database = open_db(db)
    base = zero_shot_version(database, version)
    words = load_vocabulary(vocabulary, base.model_id)
    loaded = load_model(model_source(model) if model else base.model_id, device="cpu",
                        dtype="fp32")
    s = run_suggest(database, loaded, base, words, policy=resolve)
    print_suggest_accuracy(s)
    if s.proposed is not None:
        write_proposal(s, out, model or base.model_id)
    store_suggestion(database, base, s, out.absolute() if s.proposed is not None else None)
    print_proposal(s, out)


def print_suggest_accuracy(s) -> None:
    """Held-out accuracy and recall per class, now and with the proposed descriptions."""
    if not s.folds:
        return
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"{s.version}: {s.reviews:,} reviews, {s.vocabulary:,} candidate "
              f"descriptions; held-out accuracy: current {s.current_accuracy:.1%}, "
              f"proposed {s.proposed_accuracy:.1%} "
              f"({sum(f['proposed'] > f['current'] for f in s.folds)} of "
              f"{len(s.folds)} folds gain)", markup=False)
    for cls, r in s.recall.items():
        out.print(f"  recall {cls}: {r['current']:.1%} -> {r['proposed']:.1%} "
                  f"({r['reviews']} reviews)", markup=False)


def print_proposal(s, path: Path) -> None:
    """What the proposed label file adds and retires, and how to adopt it."""
    out = Console(highlight=False, soft_wrap=True)
    if s.proposed is None:
        out.print(f"no proposal: {s.reason}", markup=False)
        return
    for a in s.additions:
        out.print(f"  {a.cls} += {a.description!r}: picks out {a.covers} reviewed "
                  f"images (AUC {a.auc:.2f})", markup=False)
    for cls, description in s.retired:
        out.print(f"  {cls} -= {description!r}: the reviews fit better without it",
                  markup=False)
    out.print(f"wrote {path} ({'added to' if s.mode == 'add' else 'in place of'} "
              f"the current descriptions); adopt it with: labelassist predict "
              f"--labels {path}", markup=False)


@command()
def accept(
    db: DbOpt = DEFAULT_DB,
    target_precision: Annotated[float, typer.Option(help="Precision what is taken must "
                                                    "reach.")] = 0.99,
    version: VersionOpt = None,
    min_support: Annotated[int, typer.Option(min=1, help="--rule class: reviews each "
                                             "class's threshold must rest on.")] = 30,
    resolve: ResolveBriefOpt = "majority",
    allow_biased_sample: Annotated[bool, typer.Option(
        "--allow-biased-sample", help="--rule class: accept even when the reviewed images "
        "are not a fair sample of the rest (reviewed in uncertainty order), where thresholds "
        "may not hold. (risk and bound rest on the fair sample alone.)")] = False,
    rule: Annotated[str, typer.Option(
        help="risk: one threshold for all classes by conformal selection on the fair "
        "sample (the tasks reviewed in push's order), each class guarded; the precision "
        "holds in expectation, from 153 fair reviews at 99%, where at least --min-taken of "
        "what it selects is taken. bound: the same with a Clopper-Pearson bound at --confidence, "
        "from about 370 reviews. class: each class's threshold reaches the target on its "
        "own --min-support reviews, with no guarantee (docs/trust.md).")] = "risk",
    confidence: Annotated[float, typer.Option(
        help="--rule bound: the probability that the precision taken reaches the "
        "target; --rule risk and bound: how sure a class guard must be that a class is "
        "worse than the target before it refuses it.")] = 0.95,
    min_class_reviews: Annotated[int, typer.Option(
        min=1, help="--rule risk and bound: reviews of a class's predictions at or above "
        "the threshold before the pooled rule speaks for it.")] = 10,
    min_taken: Annotated[float, typer.Option(
        min=0.01, max=1.0, help="--rule risk: the share of what the threshold selects that "
        "accept must really take (the rest: out-of-set images, guarded classes, images "
        "already reviewed), or it takes none; the selection's error level is (1 - target) "
        "times it, so a smaller share needs more reviews (0.65 and 99%: 153), and a "
        "larger one leaves less room for chance (docs/trust.md).")] = 0.65,
) -> None:
    """Mark unreviewed predictions as auto-accepted where the reviews show they can be
    trusted at --target-precision: by default one threshold for all classes, set by
    conformal selection on the tasks reviewed in push's order (from 153 of them at
    99%). They are recorded with provenance (source 'auto' in the export) and Label
    Studio is never told: nothing is passed off as human work. Images that match none of
    the classes well (out of set) are never accepted.

    Example: labelassist accept --target-precision 0.99 && labelassist export out/ --include-auto
    """
    from ..trust.accept import accept_trusted
    from ..trust.audit import TrustOptions

    s = accept_trusted(open_db(db), version, TrustOptions(
        target_precision, min_support, resolve, rule, confidence, min_class_reviews,
        min_taken),
        allow_biased_sample=allow_biased_sample)
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"{s.model_version}: {sum(s.accepted.values()):,} predictions auto-accepted at "
              f"{target_precision:.1%} target precision", markup=False)
    if s.bound and s.bound["threshold"] is not None and s.bound["rule"] == "risk":
        b = s.bound
        out.print(f"  one threshold for all classes: {b['threshold']:.3f}, by conformal "
                  f"selection on {b['reviews']:,} reviews of the fair sample with "
                  f"{b['errors']} errors at or above it; it selects {b['selected']:,} of the "
                  f"{b['others']:,} images outside it (expected error share of what is "
                  f"taken at most {1 - target_precision:.0%}: {b['min_taken']:.0%} or more "
                  "of the selection is taken)", markup=False)
    elif s.bound and s.bound["threshold"] is not None:
        b = s.bound
        out.print(f"  one threshold for all classes: {b['threshold']:.3f}, on {b['reviews']:,} "
                  f"reviews of the fair sample with {b['errors']} errors (error rate at most "
                  f"{b['error_bound']:.2%} at {b['confidence']:.0%} confidence)", markup=False)
    for cls, threshold in s.thresholds.items():
        if threshold is None:
            out.print(f"  {cls}: none ({s.reasons[cls]})", markup=False)
        else:
            out.print(f"  {cls}: {s.accepted[cls]:,} at confidence >= {threshold:.3f}",
                      markup=False)
    if s.out_of_set:
        out.print(f"  {s.out_of_set:,} unreviewed images match none of the classes well (out "
                  "of set): never accepted; push sends them to reviewers first", markup=False)
