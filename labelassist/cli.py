"""The `labelassist` command: one thin command per verb (parse, call core, print)."""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeRemainingColumn)
from rich.table import Table

from .config import DEFAULT_DB, DEFAULT_MODEL, LABEL_FILE_HELP, load_label_file
from .errors import LabelAssistError

app = typer.Typer(
    help="CLIP pre-labels your image folders; Label Studio reviewers fix the labels; "
         "you export a clean dataset.\n\nQuick start: labelassist run photos/ --labels labels.toml",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DbOpt = Annotated[str, typer.Option(
    "--db", envvar="LABELASSIST_DB", help="Database URL, e.g. sqlite:///labelassist.db or "
    "postgresql+psycopg://host/db.")]
LabelsOpt = Annotated[Path, typer.Option("--labels", "-l", help="Label file (TOML): classes, "
                                         "their descriptions and templates. See --help.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Hub id or local directory of a CLIP-family model. Default: the "
    f"label file's 'model', else $LABELASSIST_MODEL, else {DEFAULT_MODEL}.")]


def main() -> None:
    try:
        app()
    except LabelAssistError as exc:  # raised outside a command (e.g. while parsing)
        err.print(f"error: {exc}", markup=False)
        sys.exit(1)


def handles_errors(func):
    """Known errors: one line on stderr and exit 1. Anything else is a bug: traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from sqlalchemy.exc import OperationalError

        try:
            return func(*args, **kwargs)
        except LabelAssistError as exc:
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(1) from None
        except OperationalError as exc:  # the database went away outside a retried step
            first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            err.print(f"error: database error: {first}. Check --db / LABELASSIST_DB, then run "
                      "the command again: it resumes where it stopped", markup=False)
            raise typer.Exit(1) from None

    return wrapper


def command(*args, **kwargs):
    def register(func):
        return app.command(*args, **kwargs)(handles_errors(func))

    return register


class RateColumn(ProgressColumn):
    def render(self, task):
        unit = task.fields.get("unit", "images")
        return f"{task.speed or 0:,.1f} {unit}/s"


@contextmanager
def progress_bar(description: str, unit: str = "images"):
    """Yields on_progress(done, total), drawn on stderr."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               RateColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    # Bars are for people: in a log or a pipe they are noise, so only a terminal gets one.
    with Progress(*columns, console=err, transient=False,
                  disable=not err.is_terminal) as progress:
        task = progress.add_task(description, total=None, unit=unit)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield on_progress


def open_db(url: str):
    from .db import open_database

    return open_database(url)


@command()
def ingest(
    dirs: Annotated[list[Path], typer.Argument(help="Folders (or files) to register.")],
    db: DbOpt = DEFAULT_DB,
    max_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels than this "
                                            "(decompression bombs).")] = 178_956_970,
) -> None:
    """Register the images under DIRS: path, content hash, size, dimensions, mtime.

    Re-running does nothing for unchanged files and re-registers changed ones. The
    same content under two paths is one image (predicted and reviewed once).
    Unreadable files are recorded with their reason and never stop the run.

    Example: labelassist ingest photos/ more_photos/
    """
    from .ingest import ingest as run_ingest

    database = open_db(db)
    with progress_bar("ingest", unit="files") as on_progress:
        summary = run_ingest(database, dirs, max_pixels=max_pixels, on_progress=on_progress)
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
    from .status import workspace_status

    s = workspace_status(open_db(db))
    out = Console(highlight=False, soft_wrap=True)
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
    if s.versions or s.workers:
        out.print(f"pushed to Label Studio: {s.versions[0].pushed if s.versions else 0:,}   "
                  f"reviewed: {s.versions[0].reviewed if s.versions else 0:,}", markup=False)
    out.print(f"active workers: {len(s.workers)}", markup=False)
    for w in s.workers:
        out.print(f"  worker {w['id']} on {w['host']} pid {w['pid']}: {w['claims']} claimed, "
                  f"heartbeat {w['heartbeat_at']:%H:%M:%S}", markup=False)


PREDICT_HELP = """Classify every ingested image that has no prediction for this model_version.

A model_version is the model plus the prompt set: change the label file and you
get a new version; old predictions stay. Images whose embedding is already stored
are re-scored without being decoded again. Ctrl-C or a crash loses at most the
batch in flight: run the command again to continue.

""" + LABEL_FILE_HELP + """
Example: labelassist predict --labels examples/animals/labels.toml --batch-size 64
"""


@command(help=PREDICT_HELP)
def predict(
    labels: LabelsOpt,
    db: DbOpt = DEFAULT_DB,
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda or mps.")] =
    "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 where the hardware runs it fast: "
                                       "AMX or AVX512-BF16, else fp32), fp32, bf16, or int8 "
                                       "(CPU, dynamic quantisation; fastest without AMX).")]
    = "auto",
    exact: Annotated[bool, typer.Option("--exact", help="The reference path: fp32 and full "
                                        "decoding of every JPEG (slower).")] = False,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads (default: all cores).")]
    = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes on this machine; they "
                                         "split the cores. Workers on other machines can "
                                         "point at the same --db (PostgreSQL).")] = 1,
) -> None:
    if workers > 1:
        summary = run_predict_processes(db, labels, model, batch_size, device, dtype, exact,
                                        workers)
    else:
        summary = run_predict(db, labels, model, batch_size, device, dtype, exact, threads)
    print_predict_summary(summary)


def resolve_model_id(model, label_set=None) -> str:
    from_file = label_set.model if label_set is not None else None
    return model or from_file or os.environ.get("LABELASSIST_MODEL") or DEFAULT_MODEL


def run_predict_processes(db, labels, model, batch_size, device, dtype, exact, workers):
    from .predict import PredictOptions
    from .status import workspace_status
    from .worker import predict_in_processes

    label_set = load_label_file(labels)
    database = open_db(db)  # creates or upgrades the schema once, before the workers start
    err.print(f"starting {workers} worker processes ...", markup=False)

    def tick():
        s = workspace_status(database)
        if s.workers:
            err.print(f"  {len(s.workers)} workers, {sum(w['claims'] for w in s.workers)} "
                      "images claimed", markup=False)

    return predict_in_processes(db, resolve_model_id(model, label_set), label_set, workers,
                                device=device, dtype="fp32" if exact else dtype,
                                options=PredictOptions(batch_size=batch_size, exact=exact),
                                on_tick=tick)


def run_predict(db, labels, model, batch_size, device, dtype, exact, threads):
    from .model import load_model
    from .predict import PredictOptions
    from .predict import predict as run

    label_set = load_label_file(labels)
    database = open_db(db)
    model_id = resolve_model_id(model, label_set)
    if threads:
        import torch

        torch.set_num_threads(threads)
    loaded = load_model(model_id, device=device, dtype="fp32" if exact else dtype)
    options = PredictOptions(batch_size=batch_size, exact=exact)
    with progress_bar("predict") as on_progress:
        return run(database, loaded, label_set, options, on_progress=on_progress)


def print_predict_summary(summary) -> None:
    err.print(f"{summary.model_version}: {summary.predicted:,} predicted ({summary.encoded:,} "
              f"encoded, {summary.rescored:,} re-scored from stored embeddings), "
              f"{sum(summary.failed.values()):,} failed, {summary.images_per_second:,.1f} "
              "images/s", markup=False)
    for reason, count in summary.failed.most_common():
        err.print(f"  skipped {count:,} ({reason}), e.g. {summary.failed_examples[reason]}",
                  markup=False)


@command()
def predictions(
    db: DbOpt = DEFAULT_DB,
    version: Annotated[Optional[str], typer.Option(help="model_version (default: the newest "
                                                   "with predictions).")] = None,
    format: Annotated[str, typer.Option(help="jsonl or csv.")] = "jsonl",
) -> None:
    """Print one record per image to stdout: path, sha256, label, confidence, scores,
    model_version.

    Example: labelassist predictions --format csv > predictions.csv
    """
    from .errors import ConfigError
    from .queries import prediction_records, resolve_version

    if format not in ("jsonl", "csv"):
        raise ConfigError(f"--format {format!r}: use jsonl or csv")
    database = open_db(db)
    records = prediction_records(database, resolve_version(database, version))
    if format == "jsonl":
        for record in records:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    fields = ["path", "sha256", "label", "confidence", "margin", "scores", "model_version"]
    writer = csv.DictWriter(sys.stdout, fieldnames=fields)
    writer.writeheader()
    for record in records:
        writer.writerow({**record, "scores": json.dumps(record["scores"], ensure_ascii=False)})


LsUrlOpt = Annotated[Optional[str], typer.Option(
    "--ls-url", help="Label Studio URL (env LABEL_STUDIO_URL).")]
LsTokenOpt = Annotated[Optional[str], typer.Option(
    "--ls-token", help="Label Studio API token (env LABEL_STUDIO_API_KEY). Never stored.")]
VersionOpt = Annotated[Optional[str], typer.Option(
    "--version", help="model_version (default: the newest with predictions).")]


def ls_client(url, token):
    from .labelstudio import LabelStudioClient, resolve_connection

    return LabelStudioClient(resolve_connection(url, token))


@command()
def push(
    db: DbOpt = DEFAULT_DB,
    ls_url: LsUrlOpt = None,
    ls_token: LsTokenOpt = None,
    project: Annotated[Optional[str], typer.Option(
        help="Project title (default: 'labelassist: <classes>'); found or created.")] = None,
    version: VersionOpt = None,
    image_mode: Annotated[str, typer.Option(
        help="local: Label Studio serves files from its LOCAL_FILES_DOCUMENT_ROOT (same "
             "disk); upload: send the image bytes; auto: local for a Label Studio on this "
             "machine with a known root, else upload.")] = "auto",
    ls_root: Annotated[Optional[str], typer.Option(
        help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT, for --image-mode local "
             "(env LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT).")] = None,
    order: Annotated[str, typer.Option(
        help="Which images become tasks first: ingest, uncertain (lowest margin first: "
             "reviewers start where the model is weakest) or confident.")] = "ingest",
    batch_size: Annotated[int, typer.Option(min=1, max=5000, help="Tasks per import request "
                                            "(Label Studio handles ~1,000 in 1.5 s).")] = 500,
) -> None:
    """Push predictions to Label Studio as pre-annotations: one task per image with the
    prediction preselected (model_version and score set, so reviewers can sort by score).

    Pushing again adds nothing twice; a new model_version adds its predictions to the
    existing tasks; an interrupted push resumes where it stopped.

    Example: labelassist push --ls-url http://127.0.0.1:8080 --ls-root /data/images
    """
    from .labelstudio import push as run_push
    from .labelstudio import resolve_image_source
    from .queries import resolve_version

    database = open_db(db)
    client = ls_client(ls_url, ls_token)
    source = resolve_image_source(image_mode, ls_root, client.conn.url)
    with progress_bar("push", unit="tasks") as on_progress:
        summary = run_push(database, client, resolve_version(database, version), source,
                           title=project, order=order, batch_size=batch_size,
                           on_progress=on_progress)
    err.print(f"{summary.model_version} -> {summary.project_url}: {summary.tasks_created:,} "
              f"tasks created, {summary.predictions_added:,} predictions added to existing "
              f"tasks, {summary.recovered:,} recovered from an interrupted push", markup=False)


@command()
def pull(
    db: DbOpt = DEFAULT_DB,
    ls_url: LsUrlOpt = None,
    ls_token: LsTokenOpt = None,
    full: Annotated[bool, typer.Option("--full", help="Re-read every task, not only those "
                                       "changed since the last pull.")] = False,
) -> None:
    """Fetch reviewers' annotations that are new or changed since the last pull: the human
    label, whether the prediction was accepted unchanged, annotator, lead time. Updated,
    deleted and skipped annotations are tracked too.

    Example: labelassist pull --ls-url http://127.0.0.1:8080
    """
    from .labelstudio import pull as run_pull

    summary = run_pull(open_db(db), ls_client(ls_url, ls_token), full=full)
    err.print(f"{summary.tasks_seen:,} tasks read: {summary.new:,} new annotations, "
              f"{summary.updated:,} updated, {summary.deleted:,} deleted, {summary.unchanged:,} "
              f"unchanged ({summary.cancelled:,} skipped by reviewers)", markup=False)


@command()
def studio(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8080,
    root: Annotated[Path, typer.Option(help="Folder whose subfolders Label Studio may serve "
                                       "as local files (your image folders live below it).")]
    = Path("."),
    data_dir: Annotated[Path, typer.Option(help="Label Studio's data (its own database).")] =
    Path.home() / ".local" / "share" / "labelassist" / "label-studio",
) -> None:
    """Start a local Label Studio wired for local files and an API token, print the URL,
    login and token, and keep it running until Ctrl-C. Needs labelassist[studio].

    Example: labelassist studio --root ~/datasets   (then: labelassist push --ls-root ~/datasets)
    """
    import signal

    from .studio import start_studio

    err.print("starting Label Studio (the first start takes about 40 s) ...", markup=False)
    s = start_studio(port, root.resolve(), data_dir)
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"Label Studio is up at {s.url}  (login {s.username} / {s.password})\n"
              f"export LABEL_STUDIO_URL={s.url}\nexport LABEL_STUDIO_API_KEY={s.token}\n"
              f"export LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={s.root}", markup=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it like Ctrl-C
    try:
        s.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        s.stop()


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
    resolve: Annotated[str, typer.Option(help="When annotators disagree: majority (ties "
                                         "go to the latest) or latest.")] = "majority",
) -> None:
    """Audit model-human agreement per model_version: accuracy, Cohen's kappa, per-class
    precision/recall/F1, confusion matrix, calibration (ECE), the confidence above which
    each class reaches --target-precision, review effort and the disagreements.

    Example: labelassist report --html audit.html --json audit.json
    """
    from .audit import audit
    from .report import write_html, write_json

    from .report import learning_sections

    database = open_db(db)
    audits = audit(database, version, target_precision=target_precision,
                   min_support=min_support, policy=resolve)
    learning = learning_sections(database)
    out = Console(highlight=False, soft_wrap=True, stderr=json_out == "-")
    for a in audits:
        print_audit(out, a)
    if json_out:
        write_json(audits, json_out, learning)
    if html:
        write_html(audits, html, learning)
        err.print(f"wrote {html}", markup=False)


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


@command()
def export(
    out: Annotated[Path, typer.Argument(help="Folder to create (it must not exist, unless "
                                        "--overwrite).")],
    format: Annotated[str, typer.Option(help="imagefolder (OUT/<split>/<class>/<file>), csv "
                                        "or jsonl (manifests only), hf (loads with "
                                        "datasets.load_dataset('imagefolder', data_dir=OUT)).")]
    = "imagefolder",
    db: DbOpt = DEFAULT_DB,
    include_auto: Annotated[bool, typer.Option(help="Also export unreviewed predictions whose "
                                               "confidence clears their class's trust "
                                               "threshold (see report).")] = False,
    split: Annotated[str, typer.Option(help="train[,validation],test fractions.")] =
    "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Split seed: same seed, same split for the same "
                                      "content, whatever else is added.")] = 0,
    link: Annotated[str, typer.Option(help="copy, hardlink or symlink the images.")] = "copy",
    resolve: Annotated[str, typer.Option(help="When annotators disagree: majority (ties go "
                                         "to the latest) or latest.")] = "majority",
    version: VersionOpt = None,
    target_precision: Annotated[float, typer.Option(help="With --include-auto: precision a "
                                                    "class threshold must reach.")] = 0.99,
    min_support: Annotated[int, typer.Option(min=1)] = 30,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT (atomically).")] = False,
) -> None:
    """Export the labeled dataset: human-reviewed labels, plus trusted predictions with
    --include-auto. Every row records its provenance (human or auto, annotators,
    model_version, confidence) in OUT/manifest.jsonl; copied images are listed in
    OUT/SHA256SUMS (check with: cd OUT && sha256sum -c SHA256SUMS).

    Example: labelassist export dataset/ --format hf --split 0.8,0.1,0.1 --seed 0
    """
    from .export import export as run_export

    with progress_bar("export", unit="files") as on_progress:
        summary = run_export(open_db(db), out, format, include_auto=include_auto, split=split,
                             seed=seed, link=link, policy=resolve, version=version,
                             target_precision=target_precision, min_support=min_support,
                             overwrite=overwrite, on_progress=on_progress)
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
        out_console.print(f"  left out: {n:,} {reason}", markup=False)


@command()
def worker(
    labels: Annotated[Optional[list[Path]], typer.Option(
        "--labels", "-l", help="Label files to serve (repeatable). Prompt sets that others "
        "store for the same model are served too.")] = None,
    db: DbOpt = DEFAULT_DB,
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: str = "auto",
    dtype: str = "auto",
    poll: Annotated[float, typer.Option(help="Seconds to wait when there is no work.")] = 5.0,
    push: Annotated[bool, typer.Option("--push", help="Push new predictions to Label Studio "
                                       "after each round (--ls-url/--ls-token or env).")] = False,
    ls_url: LsUrlOpt = None,
    ls_token: LsTokenOpt = None,
    ls_root: Annotated[Optional[str], typer.Option(help="See push --ls-root.")] = None,
) -> None:
    """Run until SIGTERM or Ctrl-C, predicting whatever is pending: images that anyone
    ingests, and any new prompt set for this model. On SIGTERM it finishes the batch in
    flight and exits cleanly. Start as many as you like, on as many machines, against one
    PostgreSQL --db.

    Example: labelassist worker --db postgresql+psycopg://host/labels -l labels.toml --push
    """
    import signal
    import threading

    from .model import load_model
    from .predict import PredictOptions
    from .worker import serve

    label_sets = [load_label_file(p) for p in labels or []]
    model_id = resolve_model_id(model, label_sets[0] if label_sets else None)
    database = open_db(db)
    loaded = load_model(model_id, device=device, dtype=dtype)
    stop = threading.Event()

    def request_stop(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop now
        err.print("stopping after the batch in flight ...", markup=False)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    after_round = make_pusher(database, ls_url, ls_token, ls_root) if push else None
    err.print(f"worker on {loaded.model_key}: waiting for work (Ctrl-C to stop)", markup=False)
    stats = serve(database, loaded, label_sets, stop,
                  options=PredictOptions(batch_size=batch_size), poll_seconds=poll,
                  after_round=after_round)
    err.print(f"worker stopped: {stats.predicted:,} predicted in {stats.rounds} rounds"
              + "".join(f"; {v}: {n:,}" for v, n in stats.per_version.items()), markup=False)


def make_pusher(database, ls_url, ls_token, ls_root):
    from .labelstudio import push as run_push
    from .labelstudio import resolve_image_source

    client = ls_client(ls_url, ls_token)
    source = resolve_image_source("auto", ls_root, client.conn.url)
    seen = {"predicted": 0}

    def after_round(stats):
        if stats.predicted == seen["predicted"]:
            return
        seen["predicted"] = stats.predicted
        from .queries import resolve_version

        for name in stats.per_version:
            summary = run_push(database, client, resolve_version(database, name), source)
            stats.pushed_tasks += summary.tasks_created
            if summary.tasks_created or summary.predictions_added:
                err.print(f"pushed {summary.tasks_created:,} tasks, "
                          f"{summary.predictions_added:,} predictions ({name})", markup=False)

    return after_round


db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("migrate-to")
@handles_errors
def migrate_to(
    url: Annotated[str, typer.Argument(help="Target database URL, e.g. "
                                       "postgresql+psycopg://user@host/labels (empty).")],
    db: DbOpt = DEFAULT_DB,
) -> None:
    """Copy this workspace (images, embeddings, predictions, reviews, Label Studio links)
    into another, empty database: how a team moves from SQLite to PostgreSQL.

    Example: labelassist db migrate-to postgresql+psycopg://me@dbhost/labels
    """
    from .db.copy import copy_database

    with progress_bar("copy", unit="rows") as on_progress:
        copied = copy_database(open_db(db), url, on_progress=on_progress)
    err.print("copied " + ", ".join(f"{n:,} {t}" for t, n in copied.items() if n)
              + f". Now use --db {url}", markup=False)


@command()
def learn(
    db: DbOpt = DEFAULT_DB,
    version: Annotated[Optional[str], typer.Option(
        help="Zero-shot model_version to improve (default: the newest with predictions).")]
    = None,
    model: ModelOpt = None,
    resolve: Annotated[str, typer.Option(help="majority or latest (see report).")] =
    "majority",
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
    from .learn import learn as run_learn
    from .model import load_model
    from .queries import resolve_version

    database = open_db(db)
    base = resolve_version(database, version)
    if base.kind != "zeroshot":
        from .errors import ConfigError

        raise ConfigError(f"{base.name} is a {base.kind}; pass --version with a zero-shot one")
    loaded = load_model(model or base.model_id, device="cpu", dtype="fp32")
    s = run_learn(database, loaded, base, policy=resolve, store=store)
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"{s.base_version}: {s.reviews:,} reviews; cross-validated accuracy: zero-shot "
              f"{s.zero_shot_accuracy:.1%}, probe {s.probe_accuracy:.1%} (lambda "
              f"{s.chosen_lambda}); temperature {s.temperature:.2f}, ECE {s.ece_before:.3f} -> "
              f"{s.ece_after:.3f}", markup=False)
    if s.stored_version:
        out.print(f"stored {s.stored_predictions:,} predictions as {s.stored_version}: "
                  f"labelassist push --version {s.stored_version}", markup=False)
    else:
        out.print("the probe does not beat zero-shot on held-out reviews: nothing stored",
                  markup=False)
    if s.label_issues:
        out.print(f"{len(s.label_issues)} human labels worth a second look (see report)",
                  markup=False)


@command()
def accept(
    db: DbOpt = DEFAULT_DB,
    target_precision: Annotated[float, typer.Option(help="Precision each class's threshold "
                                                    "must reach on the reviews.")] = 0.99,
    version: VersionOpt = None,
    min_support: Annotated[int, typer.Option(min=1)] = 30,
    resolve: str = "majority",
) -> None:
    """Mark unreviewed predictions as auto-accepted where their class's audited threshold
    says they can be trusted. They are recorded with provenance (source 'auto' in the
    export) and Label Studio is never told: nothing is passed off as human work.

    Example: labelassist accept --target-precision 0.99 && labelassist export out/ --include-auto
    """
    from .accept import accept_trusted

    s = accept_trusted(open_db(db), version, target_precision=target_precision,
                       min_support=min_support, policy=resolve)
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"{s.model_version}: {sum(s.accepted.values()):,} predictions auto-accepted at "
              f"{target_precision:.1%} target precision", markup=False)
    for cls, threshold in s.thresholds.items():
        if threshold is None:
            out.print(f"  {cls}: none ({s.reasons[cls]})", markup=False)
        else:
            out.print(f"  {cls}: {s.accepted[cls]:,} at confidence >= {threshold:.3f}",
                      markup=False)


@command(name="run")
def run_all(
    dirs: Annotated[list[Path], typer.Argument(help="Folders of images.")],
    labels: LabelsOpt,
    db: DbOpt = DEFAULT_DB,
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: str = "auto",
    dtype: str = "auto",
    exact: bool = False,
) -> None:
    """Ingest DIRS, then predict every new image.

    Example: labelassist run photos/ --labels labels.toml
    """
    from .ingest import ingest as run_ingest

    database = open_db(db)
    with progress_bar("ingest", unit="files") as on_progress:
        print_ingest_summary(run_ingest(database, dirs, on_progress=on_progress))
    print_predict_summary(run_predict(db, labels, model, batch_size, device, dtype, exact, None))


if __name__ == "__main__":
    main()
