"""Verbs that produce the results: report and export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..labels import DEFAULT_DB
from . import DbOpt, VersionOpt, command, err, open_db, progress_bar

ResolveOpt = Annotated[str, typer.Option(
    help="When annotators disagree: majority (ties go to the latest) or latest.")]
ExportFormatOpt = Annotated[str, typer.Option(
    help="imagefolder (OUT/<split>/<class>/<file>), csv or jsonl (manifests only), hf (loads "
    "with datasets.load_dataset('imagefolder', data_dir=OUT)).")]


@command()
def report(
    db: DbOpt = DEFAULT_DB,
    html: Annotated[Optional[Path], typer.Option(help="Write a self-contained HTML report "
                                                 "(charts and thumbnails embedded).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the JSON report "
                                                    "to FILE ('-' for stdout).")] = None,
    version: Annotated[Optional[str], typer.Option(help="Audit only this model_version "
                                                   "(default: every reviewed one).")] = None,
    target_precision: Annotated[float, typer.Option(help="Precision a class must reach for "
                                                    "its trust threshold.")] = 0.99,
    min_support: Annotated[int, typer.Option(min=1, help="Reviews a threshold needs before "
                                             "it is trusted.")] = 30,
    resolve: ResolveOpt = "majority",
    rule: Annotated[str, typer.Option(
        help="The session replay's auto-accept: accept's --rule (risk, bound or class) "
        "from the reviews made so far.")] = "risk",
) -> None:
    """Audit model-human agreement per model_version: accuracy, Cohen's kappa, per-class
    precision/recall/F1, confusion matrix, calibration (ECE), the confidence above which
    each class reaches --target-precision, review effort and the disagreements; and the
    images that match none of the classes well (out of set: never auto-accepted).
    Before any review it describes the version instead: the classes predicted, the spread
    of confidence and the out-of-set images (with thumbnails in --html).

    Example: labelassist report --html audit.html --json audit.json
    """
    from ..db.queries import resolve_version
    from ..outputs.preview import preview_sections
    from ..outputs.report import write_html, write_json
    from ..trust.audit import NoReviews, TrustOptions, audit

    database = open_db(db)
    trust = TrustOptions(target_precision, min_support, resolve, rule)
    try:
        audits, waiting = audit(database, version, trust), None
    except NoReviews as exc:  # nothing reviewed yet: describe what predict found
        audits, waiting = [], str(exc)
    sections = report_sections(database, audits, trust)
    if waiting:
        sections["preview"] = preview_sections(database,
                                               [resolve_version(database, version).name])
        print_previews(Console(highlight=False, soft_wrap=True, stderr=json_out == "-"),
                       sections["preview"], waiting)
    print_report(Console(highlight=False, soft_wrap=True, stderr=json_out == "-"), audits,
                 sections)
    if json_out:
        write_json(audits, json_out, sections)
    if html:
        write_html(audits, html, sections)
        err.print(f"wrote {html}", markup=False)


def report_sections(database, audits, trust) -> dict:
    """The report's sections beside the audits: learning, the replayed session,
    suggestions, out of set and runtimes."""
    from ..outputs.report import learning_sections
    from ..predict import runtime_sections
    from ..trust.outofset import out_of_set_sections
    from ..trust.replay import session_sections
    from ..trust.suggest import suggestion_sections

    return {
        "learning": learning_sections(database),
        "session": session_sections(database, trust),
        "suggestions": suggestion_sections(database),
        "out_of_set": out_of_set_sections(database, [a.model_version for a in audits],
                                          policy=trust.policy),
        "runtimes": runtime_sections(database, [a.model_version for a in audits])}


def print_report(out: Console, audits, sections: dict) -> None:
    from ..predict import describe_choice

    for a in audits:
        print_audit(out, a)
    for flagged in sections["out_of_set"]:
        print_out_of_set(out, flagged)
    for chosen in sections["runtimes"]:
        out.print(f"{chosen['model_version']} ran on {describe_choice(chosen)}", markup=False)
    for section in sections["session"]:
        print_session(out, section)
    for found in sections["suggestions"]:
        print_suggestion(out, found)


def print_previews(out: Console, previews: list[dict], waiting: str) -> None:
    for p in previews:
        spread = p["confidence"]
        out.print(f"{p['model_version']}: {p['predicted']:,} images predicted, no audit yet "
                  f"({waiting})", markup=False)
        out.print("  classes predicted: " + ", ".join(
            f"{c} {v['count']:,} ({v['share']:.0%})" for c, v in p["classes"].items()
            if v["count"]), markup=False)
        if p["predicted"]:
            out.print(f"  confidence: median {spread['median']:.2f}; 10% of images below "
                      f"{spread['p10']:.2f}, 90% below {spread['p90']:.2f}", markup=False)
        out.print(f"  out of set: {p['out_of_set']['flagged']:,} images match none of the "
                  "classes well (labelassist predictions marks them; --html shows them)",
                  markup=False)


def print_out_of_set(out: Console, flagged: dict) -> None:
    """Images that match none of the classes: flagged, and what reviewers said of them."""
    from ..trust.outofset import OTHER

    if flagged["without_similarity"]:
        out.print(f"out of set for {flagged['model_version']}: {flagged['without_similarity']:,} "
                  "predictions were made before labelassist measured how well an image "
                  "matches its class, and are never flagged: run labelassist predict again "
                  "with the same label file to measure them (seconds)", markup=False)
    said = (f"; reviewers said {OTHER!r} for {flagged['flagged_reviewed_other']:,} of the "
            f"{flagged['flagged_reviewed']:,} flagged they saw" if flagged["flagged_reviewed"]
            else "")
    out.print(f"out of set for {flagged['model_version']}: {flagged['flagged']:,} images match "
              "none of the classes well (never auto-accepted; push sends them first)" + said,
              markup=False)


def print_suggestion(out: Console, found: dict) -> None:
    """What suggest found last for a version: held-out accuracy before and after."""
    outcome = (f"adopted as {found['adopted_as']}" if found["adopted_as"] else
               f"proposed in {found['out_path']}" if found["proposed"] else "no proposal")
    out.print(f"suggest for {found['model_version']} ({found['reviews']:,} reviews): held-out "
              f"accuracy {found['current_accuracy']:.1%} now, {found['proposed_accuracy']:.1%} "
              f"with the suggested descriptions; {outcome}", markup=False)


def print_session(out: Console, section: dict) -> None:
    """The review session replayed: per version, how it did on what was reviewed later."""
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    out.print(f"session from {section['base']} ({section['reviews']:,} reviews; accuracy on "
              f"the images reviewed later, and what accept --rule {section['rule']} would "
              "have taken then):", markup=False)
    for p in section["points"]:
        out.print(f"  {p['reviews']:>6,} reviews  {p['model_version']:<24} accuracy "
                  f"{pct(p['accuracy_later_reviewed'])} of {p['later_reviewed']:,}; accept "
                  f"{pct(p['accept_share'])} of {p['unreviewed']:,} at measured precision "
                  f"{pct(p['accept_precision'])} ({p['accept_checked']:,} checked)",
                  markup=False)


def print_audit(out: Console, a) -> None:
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    out.print(f"{a.model_version}: {a.reviewed:,} reviewed, accuracy {pct(a.accuracy)}, "
              f"accepted unchanged {pct(a.agreement)}, kappa {a.cohen_kappa:.3f}, ECE "
              f"{a.calibration['ece']:.3f}, {len(a.disagreements):,} disagreements",
              markup=False)
    table = Table("class", "precision", "recall", "F1", "support", "threshold", "coverage")
    per_class = a.thresholds["per_class"]
    for name, m in a.per_class.items():
        t = per_class.get(name, {})
        table.add_row(name, pct(m["precision"]), pct(m["recall"]), pct(m["f1"]),
                      str(m["support"]), "-" if t.get("threshold") is None else
                      f"{t['threshold']:.3f}", pct(t.get("coverage")))
    out.print(table)
    for name, t in per_class.items():
        if t.get("threshold") is None and t.get("reason"):
            out.print(f"no threshold for {name}: {t['reason']}", markup=False)


@command()
def export(
    out: Annotated[Path, typer.Argument(help="Folder to create (it must not exist, unless "
                                        "--overwrite).")],
    format: ExportFormatOpt = "imagefolder",
    db: DbOpt = DEFAULT_DB,
    include_auto: Annotated[bool, typer.Option(help="Also export unreviewed predictions whose "
                                               "confidence clears their class's trust "
                                               "threshold (see report).")] = False,
    split: Annotated[str, typer.Option(help="train[,validation],test fractions.")] =
    "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Split seed: same seed, same split for the same "
                                      "content, whatever else is added.")] = 0,
    link: Annotated[str, typer.Option(help="copy, hardlink or symlink the images.")] = "copy",
    resolve: ResolveOpt = "majority",
    version: VersionOpt = None,
    target_precision: Annotated[float, typer.Option(help="With --include-auto: precision a "
                                                    "class threshold must reach.")] = 0.99,
    min_support: Annotated[int, typer.Option(min=1)] = 30,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT (atomically).")] = False,
    allow_biased_sample: Annotated[bool, typer.Option(
        "--allow-biased-sample", help="With --include-auto: trust thresholds even from "
        "reviews that are not a fair sample of the rest (see accept).")] = False,
    rule: Annotated[str, typer.Option(
        help="With --include-auto: the trust rule, as accept's --rule (risk, bound or "
        "class; bound at 95% confidence).")] = "risk",
    min_taken: Annotated[float, typer.Option(
        min=0.01, max=1.0, help="With --include-auto --rule risk: as accept's.")] = 0.65,
) -> None:
    """Export the labeled dataset: human-reviewed labels, plus trusted predictions with
    --include-auto. Every row records its provenance (human or auto, annotators,
    model_version, confidence) in OUT/manifest.jsonl; copied images are listed in
    OUT/SHA256SUMS (check with: cd OUT && sha256sum -c SHA256SUMS).

    Example: labelassist export dataset/ --format hf --split 0.8,0.1,0.1 --seed 0
    """
    from ..outputs.export import export as run_export
    from ..trust.audit import TrustOptions

    with progress_bar("export", unit="files") as on_progress:
        summary = run_export(open_db(db), out, format, include_auto=include_auto, split=split,
                             seed=seed, link=link, version=version,
                             overwrite=overwrite, on_progress=on_progress,
                             allow_biased_sample=allow_biased_sample,
                             trust=TrustOptions(target_precision, min_support, resolve,
                                                rule, min_taken=min_taken))
    print_export_summary(summary)


def print_export_summary(summary) -> None:
    splits = sorted({s for c in summary.per_class_split.values() for s in c},
                    key=["train", "validation", "test"].index)
    table = Table("class", *splits, "total")
    for label, counts in sorted(summary.per_class_split.items()):
        table.add_row(label, *(f"{counts[s]:,}" for s in splits), f"{sum(counts.values()):,}")
    out_console = Console(highlight=False, soft_wrap=True)
    out_console.print(table)
    out_console.print(f"{summary.rows:,} images to {summary.out} ({summary.format}): "
                      + ", ".join(f"{n:,} {k}" for k, n in summary.per_source.items()),
                      markup=False)
    for reason, n in summary.excluded.most_common():
        example = summary.excluded_examples.get(reason)
        out_console.print(f"  left out: {n:,} {reason}" + (f" (e.g. {example})" if example
                                                            else ""), markup=False)
