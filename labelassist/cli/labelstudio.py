"""Verbs that talk to Label Studio: push, pull, studio."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..labels import DEFAULT_DB
from ..workspace import data_root
from . import (
    DbOpt,
    LsTokenOpt,
    LsRootOpt,
    LsUrlOpt,
    VersionOpt,
    command,
    err,
    ls_client,
    open_db,
    progress_bar,
)


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
    ls_root: LsRootOpt = None,
    order: Annotated[str, typer.Option(
        help="Which images become tasks first. random (the default): a fixed shuffle, so "
             "reviewers who work in task order review a fair sample, which learn learns "
             "fastest from and suggest and accept need (file names often sort by class: "
             "ingest order would show one class first). In benchmarks/clean_cost.py no "
             "order cost fewer reviews, on three tasks in three shuffles, and it is the "
             "fair sample accept's rules rest on (risk needs 153 reviews, bound 368; "
             "docs/trust.md). flagged: the images flagged out of set first, then the "
             "shuffle (reviewers meet the junk first; it cost 200 more reviews on the "
             "24-class task). ingest: as ingested; uncertain: lowest margin first; "
             "confident: surest first.")] = "random",
    batch_size: Annotated[int, typer.Option(min=1, max=5000, help="Tasks per import request "
                                            "(Label Studio handles ~1,000 in 1.5 s).")] = 500,
) -> None:
    """Push predictions to Label Studio as pre-annotations: one task per image with the
    prediction preselected (model_version and score set, so reviewers can sort by score).

    Pushing again adds nothing twice; a new model_version adds its predictions to the
    existing tasks; an interrupted push resumes where it stopped.

    Example: labelassist push --ls-url http://127.0.0.1:8080 --ls-root /data/images
    """
    from ..labelstudio import push as run_push
    from ..labelstudio import resolve_image_source
    from ..db.queries import resolve_version

    database = open_db(db)
    client = ls_client(ls_url, ls_token)
    source = resolve_image_source(image_mode, ls_root, client.conn.url)
    with progress_bar("push", unit="tasks") as on_progress:
        summary = run_push(database, client, resolve_version(database, version), source,
                           title=project, order=order, batch_size=batch_size,
                           on_progress=on_progress,
                           on_wait=lambda line: err.print(line, markup=False))
    print_push_summary(summary)


def print_push_summary(summary) -> None:
    err.print(f"{summary.model_version} -> {summary.project_url}: {summary.tasks_created:,} "
              f"tasks created, {summary.predictions_added:,} predictions added to existing "
              f"tasks, {summary.recovered:,} recovered from an interrupted push", markup=False)
    if summary.skipped_no_file:
        err.print(f"  skipped {summary.skipped_no_file:,} predictions of images with no file "
                  "left (edited or deleted since; their new content has its own)", markup=False)
    if summary.skipped_changed:
        err.print(f"  skipped {summary.skipped_changed:,} images whose file changed since "
                  "ingest (reviewers would see other pixels): run labelassist ingest, "
                  "predict, then push again", markup=False)
    if summary.tasks_gone:
        err.print(f"  {summary.tasks_gone:,} tasks were deleted in Label Studio (or their ids "
                  "given to other tasks) since the last push: forgotten", markup=False)
    if summary.skipped_deleted:
        err.print(f"  {summary.skipped_deleted:,} images whose task was deleted in Label "
                  "Studio were not made tasks again", markup=False)


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
    from ..labelstudio import pull as run_pull

    database, client = open_db(db), ls_client(ls_url, ls_token)
    with progress_bar("pull", unit="tasks") as on_progress:
        summary = run_pull(database, client, full=full, on_progress=on_progress)
    err.print(f"{summary.tasks_seen:,} tasks read: {summary.new:,} new annotations, "
              f"{summary.updated:,} updated, {summary.deleted:,} deleted, {summary.unchanged:,} "
              f"unchanged ({summary.cancelled:,} skipped by reviewers)", markup=False)
    if summary.tasks_gone:
        err.print(f"  {summary.tasks_gone:,} reviewed tasks were deleted in Label Studio: "
                  "their annotations no longer count", markup=False)
    if summary.tasks_replaced:
        err.print(f"  {summary.tasks_replaced:,} task ids now name other tasks (Label Studio "
                  "gave a deleted task's id again): the old reviews no longer count",
                  markup=False)
    if summary.unknown_tasks:
        made = "task" if summary.unknown_tasks == 1 else "tasks"
        err.print(f"  {summary.unknown_tasks:,} {made} made in Label Studio by hand (not "
                  "pushed by labelassist) left alone: no image here to give their labels to",
                  markup=False)


@command()
def studio(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8080,
    root: Annotated[Path, typer.Option(help="Folder whose subfolders Label Studio may serve "
                                       "as local files (your image folders live below it); "
                                       "it is linked into the document root that Label "
                                       "Studio keeps in --data-dir, beside the --root of "
                                       "every earlier start. Default: the workspace's root, "
                                       "else here.")]
    = Path("."),
    data_dir: Annotated[Path, typer.Option(help="Label Studio's data (its own database).")] =
    data_root() / "label-studio",
) -> None:
    """Start a local Label Studio wired for local files and an API token, print the URL,
    login and token, and keep it running until Ctrl-C. Needs labelassist[studio].
    In a workspace it records its URL, where its token is kept and its document root, so
    push and pull run there need no flags and no exported variables. One Label Studio
    serves many workspaces: each one's images keep showing whichever started it last.

    Example: labelassist studio --root ~/datasets   (then paste the export lines it prints)
    """
    import signal

    from ..labelstudio.studio import start_studio

    err.print("starting Label Studio (the first start takes about 40 s) ...", markup=False)
    s = start_studio(port, root.resolve(), data_dir)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it like Ctrl-C
    try:
        if s.note:
            err.print(f"note: {s.note}", markup=False)
        record_studio_in_workspace(s)  # before the lines are printed: a script may act on them
        Console(highlight=False, soft_wrap=True).print(
            f"Label Studio is up at {s.url}  (login {s.username} / {s.password})\n"
            f"export LABEL_STUDIO_URL={s.url}\nexport LABEL_STUDIO_API_KEY={s.token}\n"
            f"export LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={s.root}", markup=False)
        s.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        s.stop()


def record_studio_in_workspace(s) -> None:
    from ..labelstudio.studio import TOKEN_FILE
    from ..workspace import relative_to, update_workspace
    from . import workspace

    if workspace is None:
        return
    update_workspace(workspace, ls_url=s.url, root=relative_to(workspace.folder, s.folder),
                     ls_token_file=relative_to(workspace.folder, s.data_dir / TOKEN_FILE),
                     ls_root=relative_to(workspace.folder, s.root))
    err.print(f"recorded in {workspace.file}: push and pull run there need none of the "
              "lines below", markup=False)

