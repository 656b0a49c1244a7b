"""The `labelassist` command: one thin command per verb (parse, call core, print).

Shared here: the app, error handling, progress bars and common options. The verbs live
in labeling.py, review.py, outputs.py and db.py, grouped by the user's task."""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from ..config import DEFAULT_MODEL
from ..errors import LabelAssistError

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
    from ..db import open_database

    return open_database(url)


LsUrlOpt = Annotated[Optional[str], typer.Option(
    "--ls-url", envvar="LABEL_STUDIO_URL", help="Label Studio URL.")]
LsTokenOpt = Annotated[Optional[str], typer.Option(
    "--ls-token", envvar="LABEL_STUDIO_API_KEY", help="Label Studio API token. Prefer the "
    "env var: a token on the command line is visible in ps to every user of the machine. "
    "Never stored.")]
LsRootOpt = Annotated[Optional[str], typer.Option(
    "--ls-root", envvar="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT",
    help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT, for --image-mode local.")]
VersionOpt = Annotated[Optional[str], typer.Option(
    "--version", help="model_version (default: the newest with predictions).")]


def ls_client(url, token):
    from ..labelstudio import LabelStudioClient, resolve_connection

    return LabelStudioClient(resolve_connection(url, token),  # never wait in silence
                             on_retry=lambda line: err.print(line, markup=False))


def resolve_model_id(model, label_set=None) -> str:
    from_file = label_set.model if label_set is not None else None
    return model or from_file or os.environ.get("LABELASSIST_MODEL") or DEFAULT_MODEL




# Register the verbs (in --help order).
from . import db, labeling, outputs, review  # noqa: E402,F401
