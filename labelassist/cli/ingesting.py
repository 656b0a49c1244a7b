"""Verbs that set a workspace up and say where it stands: init, ingest, status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..labels import DEFAULT_DB, load_label_file
from . import DbOpt, command, err, open_db, option_source, progress_bar


@command()
def init(
    folder: Annotated[Path, typer.Argument(help="The workspace folder (made if missing).")] =
    Path("."),
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", "-l", help="Label file that predict, run and learn use.")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Hub id or local folder of the model.")] = None,
    db: Annotated[Optional[str], typer.Option(
        help="Database: a file or a URL. Default: labelassist.db in the workspace.")] = None,
    root: Annotated[Optional[Path], typer.Option(
        help="Folder Label Studio serves the images from (studio --root, push --ls-root). "
        "Default: the workspace folder.")] = None,
    ls_url: Annotated[Optional[str], typer.Option(
        help="Label Studio URL (labelassist studio records its own).")] = None,
) -> None:
    """Make FOLDER a workspace: write FOLDER/labelassist.toml, which records the database,
    label file, model and image root. Every command run in FOLDER or below it then needs
    no --db, --labels, --model or --ls-root (a flag or an env var still wins).
    `labelassist studio` run there records its URL and where its token is kept, so push
    and pull need no flags either. Run init again to change one setting; the rest stay.

    Example: labelassist init . --labels labels.toml --model openai/clip-vit-base-patch32
    """
    from ..workspace import FILE_NAME, load_workspace, save_workspace

    folder = folder.absolute()
    existing = (folder / FILE_NAME).is_file()
    settings = load_workspace(folder / FILE_NAME).settings if existing else \
        {"db": "labelassist.db", "root": "."}
    # What the workspace in force here filled in was not given: it must not be copied,
    # made absolute, into FOLDER's file (the same one, or another workspace's).
    given = {name: None if option_source(name) == "DEFAULT_MAP" else value
             for name, value in (("labels", labels), ("model", model), ("db", db),
                                 ("root", root), ("ls_url", ls_url))}
    settings.update(changed_settings(folder, **given))
    ws = save_workspace(folder, settings)
    err.print(f"{'updated' if existing else 'wrote'} {ws.file}:", markup=False)
    for key, value in ws.settings.items():
        err.print(f"  {key} = {value}", markup=False)
    err.print(f"Commands run in {ws.folder} (or below it) now use these settings.",
              markup=False)


def changed_settings(folder: Path, labels, model, db, root, ls_url) -> dict:
    """The settings init was given, as labelassist.toml records them (paths relative to
    the workspace folder)."""
    from ..workspace import relative_to

    settings = {}
    if labels is not None:
        load_label_file(labels)  # a mistake is reported now, not at the first predict
        settings["labels"] = relative_to(folder, labels)
    if model is not None:
        settings["model"] = relative_to(folder, Path(model)) if Path(model).exists() else model
    if db is not None:
        settings["db"] = db if "://" in db else relative_to(folder, Path(db).absolute())
    if root is not None:
        settings["root"] = relative_to(folder, root)
    if ls_url is not None:
        settings["ls_url"] = ls_url
    return settings


@command()
def ingest(
    dirs: Annotated[list[str], typer.Argument(
        help="Folders, image files, or object storage URLs (s3://bucket/prefix) to "
        "register.")],
    db: DbOpt = DEFAULT_DB,
    max_pixels: Annotated[int, typer.Option(min=1, help="Refuse images with more pixels "
                                            "than this (decompression bombs).")] = 178_956_970,
    workers: Annotated[Optional[int], typer.Option(
        min=1, help="Files checked in parallel (default: the cores; worker processes from "
        "2,000 files on; 16 threads for objects in a bucket).")] = None,
) -> None:
    """Register the images under DIRS: path, content hash, size, dimensions, mtime.

    Re-running does nothing for unchanged files and re-registers changed ones. The
    same content under two paths is one image (predicted and reviewed once).
    Unreadable files are recorded with their reason and never stop the run.
    Objects in a bucket (pip install 'labelassist[s3]') are listed a page at a time and
    go by ETag and size; credentials come from the AWS variables or ~/.aws, never a flag.

    Example: labelassist ingest photos/ more_photos/ s3://my-bucket/photos
    """
    from ..ingest import ingest as run_ingest

    database = open_db(db, create=True)
    with progress_bar("ingest", unit="files") as on_progress:
        summary = run_ingest(database, dirs, max_pixels=max_pixels, workers=workers,
                             on_progress=on_progress)
    print_ingest_summary(summary)


def print_ingest_summary(summary) -> None:
    err.print(f"{summary.seen:,} files: {summary.added:,} added, {summary.duplicates:,} "
              f"duplicates of known content, {summary.unchanged:,} unchanged, "
              f"{summary.changed:,} changed, {summary.error_count:,} errors", markup=False)
    for reason, count in summary.errors.most_common():
        example = summary.error_examples.get(reason)
        err.print(f"  {reason}: {count:,}" + (f" (e.g. {example})" if example else ""),
                  markup=False)

@command()
def status(db: DbOpt = DEFAULT_DB) -> None:
    """Counts per state: files, images, errors, predictions per model_version, workers.

    Example: labelassist status --db sqlite:///labelassist.db
    """
    from ..predict import describe_choice, version_choice
    from ..db.status import workspace_status

    from . import workspace

    database = open_db(db)
    s = workspace_status(database)
    out = Console(highlight=False, soft_wrap=True)
    if workspace is not None:
        out.print(f"workspace: {workspace.file}", markup=False)
    out.print(f"files: {s.files:,}   images: {s.images:,}", markup=False)
    for title, errors in (("file errors", s.file_errors), ("image errors", s.image_errors)):
        if errors:
            out.print(f"{title}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(errors.items())),
                      markup=False)
    if s.versions:
        table = Table("model_version", "predicted", "pending", "auto-accepted")
        for v in s.versions:
            table.add_row(v.name, f"{v.predicted:,}", f"{v.pending:,}", f"{v.auto_accepted:,}")
        out.print(table)
        for v in s.versions:
            choice = version_choice(database, v.name)
            if choice:
                out.print(f"{v.name} runs on {describe_choice(choice)}", markup=False)
        print_out_of_set_counts(out, database, s.versions)
    if s.versions or s.workers:
        out.print(f"pushed to Label Studio: {s.versions[0].pushed if s.versions else 0:,}   "
                  f"reviewed: {s.versions[0].reviewed if s.versions else 0:,}", markup=False)
    out.print(f"active workers: {len(s.workers)}", markup=False)
    print_serve_status(out, db)
    for w in s.workers:
        out.print(f"  worker {w['id']} on {w['host']} pid {w['pid']}: {w['claims']} claimed, "
                  f"heartbeat {w['heartbeat_at']:%H:%M:%S}", markup=False)


def print_out_of_set_counts(out: Console, database, versions) -> None:
    """Per zero-shot version, the images that match none of its classes well (before any
    review too: the flag push orders by, docs/trust.md)."""
    from ..db.queries import resolve_version
    from ..trust.outofset import flagged_images

    for v in versions:
        if v.kind == "zeroshot" and v.predicted:
            n = len(flagged_images(database, resolve_version(database, v.name)))
            out.print(f"{v.name} out of set: {n:,} images match none of the classes well "
                      "(push sends them first; labelassist predictions shows which)",
                      markup=False)


def print_serve_status(out: Console, db: str) -> None:
    """What `labelassist serve` reported last (it keeps a JSON file beside the ledger)."""
    from ..serve import status_file_for

    path = status_file_for(db)
    try:
        s = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return
    if not s:
        return
    state = "running" if s.get("running") else "stopped"
    out.print(f"serve ({state}, {s['updated_at']}): project {s['project']!r}, showing "
              f"{s['model_version']}; {s['reviews_recorded']:,} reviews recorded live, "
              f"{s['predictions_served']:,} predictions served, {s['images_fetched']:,} "
              "images fetched", markup=False)
    if s.get("events_waiting"):
        out.print(f"  {s['events_waiting']:,} review events journaled and not yet stored "
                  f"(Label Studio unreachable?): {(s.get('errors') or ['?'])[-1]}",
                  markup=False)
    if s.get("events_set_aside"):
        out.print(f"  {s['events_set_aside']:,} review events set aside after failing "
                  "again and again while Label Studio answered (their reviews arrive with "
                  "the next `labelassist pull`)", markup=False)
    learned = s.get("last_learn")
    if learned:
        share = s.get("auto_accept_share")
        out.print(f"  last learn {learned['at']} on {learned['reviews']:,} reviews: "
                  f"probe {learned['probe_accuracy']:.1%} against zero-shot "
                  f"{learned['zero_shot_accuracy']:.1%} (cross-validated); "
                  + (f"{learned['stored_version']} sent to Label Studio"
                     if learned["stored_version"] else "zero-shot kept")
                  + (f"; accept would now take {share:.0%} of the rest"
                     if share is not None else ""), markup=False)
        if s.get("accept_refused"):
            out.print(f"  accept refuses: {s['accept_refused']}", markup=False)

