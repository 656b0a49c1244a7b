"""The `labelassist` command: one thin command per verb (parse, call core, print).

Shared here: the app, error handling, progress bars and common options. The verbs live
in a module per stage, imported at the bottom in --help order:
  ingesting.py    init, ingest, status
  predicting.py   predict, runtimes, predictions, worker, run
  outputs.py      report, export
  labelstudio.py  push, pull, studio
  trust.py        learn, suggest, accept
  serving.py      serve
  db.py           db migrate-to"""

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

from ..labels import DEFAULT_MODEL, TOY_MODEL
from ..errors import DatabaseError, LabelAssistError

app = typer.Typer(
    help="CLIP pre-labels your image folders; Label Studio reviewers fix the labels; "
         "you export a clean dataset.\n\nQuick start: labelassist run photos/ --labels labels.toml",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None)
err = Console(stderr=True, highlight=False, soft_wrap=True)

def as_database_url(value: str) -> str:
    """--db: a plain path means an SQLite file; every command then sees a URL."""
    from ..db import database_url

    return database_url(value)


DbOpt = Annotated[str, typer.Option(
    "--db", envvar="LABELASSIST_DB", callback=as_database_url, help="Database: an SQLite "
    "file (labelassist.db) or a URL, e.g. postgresql+psycopg://host/db.")]
LabelsOpt = Annotated[Path, typer.Option("--labels", "-l", help="Label file (TOML): classes, "
                                         "their descriptions and templates. See --help.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Hub id or local directory of a CLIP-family model, or "
    f"'{TOY_MODEL}' for the toy model shipped with labelassist (works offline). Default: "
    "$LABELASSIST_MODEL, else the workspace's, else the label file's 'model', else "
    f"{DEFAULT_MODEL}.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda or mps.")]


WORKSPACE_HELP = ("Run inside a workspace (`labelassist init`: a labelassist.toml found by "
                  "walking up from here) and --db, --labels, --model, --ls-url and --ls-root "
                  "default to what it records. File formats: docs/formats.md.")
workspace = None  # the labelassist.toml in force for this command, if any


@app.callback(epilog=WORKSPACE_HELP)
def find_workspace_defaults(
    ctx: typer.Context,
    be_quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", envvar="LABELASSIST_QUIET", help="No progress bars or progress "
        "lines (for scripts); summaries and errors still print. Give it before the "
        "command: labelassist -q push.")] = False,
) -> None:
    """Options settle as: the flag, else its environment variable, else the workspace's
    labelassist.toml, else the built-in default (click's default_map sits in that place)."""
    global workspace, quiet
    quiet = be_quiet
    from ..workspace import find_workspace

    try:
        workspace = find_workspace(Path.cwd())
    except LabelAssistError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from None
    if workspace is None:
        return
    defaults = workspace.cli_defaults()
    group = ctx.command
    ctx.default_map = {}
    for name, cmd in getattr(group, "commands", {}).items():
        params = {p.name: p for p in cmd.params}
        mine = {k: v for k, v in defaults.items() if k in params}
        if "labels" in mine and params["labels"].multiple:
            mine["labels"] = [mine["labels"]]  # the worker serves a list of label files
        ctx.default_map[name] = mine


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
        except KeyboardInterrupt:  # Ctrl-C: say what the ledger kept, and how to go on
            stop_interrupted(func)
        except OperationalError as exc:  # the database went away outside a retried step
            if interrupted_by_user(exc):  # a clean-up after Ctrl-C failed: still Ctrl-C
                stop_interrupted(func)
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
        speed = task.finished_speed or task.speed
        elapsed = task.finished_time or task.elapsed
        if speed is None and elapsed:  # one update so far: rich has no gaps to estimate from
            speed = task.completed / elapsed
        return f"{speed or 0:,.1f} {unit}/s"


quiet = False  # --quiet: no bars, no progress lines; summaries and errors still print


# What each long step has done, for the line Ctrl-C prints: the core reports progress
# after a batch is written, so what it counts is kept.
DONE = {"predict": "predicted", "push": "sent to Label Studio", "pull": "read",
        "ingest": "registered", "export": "written", "copy": "copied"}
last_progress: dict = {}


def interrupted_by_user(exc: BaseException) -> bool:
    """Whether a Ctrl-C is what this error happened in the wake of."""
    seen = exc.__context__
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def stop_interrupted(func) -> None:
    err.print(interrupted_message(func.__name__.replace("_", "-")), markup=False)
    raise typer.Exit(130) from None


def interrupted_message(command: str | None) -> str:
    again = f"run `labelassist {command or ''}` again with the same options to go on"
    if not last_progress:
        return f"interrupted: nothing written is lost (each batch is written whole); {again}"
    step, unit, done, total = (last_progress[k] for k in ("step", "unit", "done", "total"))
    of = f" of {total:,}" if total else ""
    return (f"interrupted: {done:,}{of} {unit} {DONE.get(step, 'done')} and kept (each batch "
            f"is written whole); {again} from there")


@contextmanager
def progress_bar(description: str, unit: str = "images"):
    """Yields on_progress(done, total), drawn on stderr: a bar on a terminal, and in a
    log or a pipe a plain line every LABELASSIST_PROGRESS_EVERY seconds (10), so a long
    command in CI or under nohup is never minutes of silence. The last call is kept for
    the line that Ctrl-C prints."""
    with _drawn_progress(description, unit) as draw:
        def on_progress(done: int, total: int) -> None:
            last_progress.update(step=description, unit=unit, done=done, total=total)
            draw(done, total)

        yield on_progress


@contextmanager
def _drawn_progress(description: str, unit: str):
    if quiet:
        yield lambda done, total: None
        return
    if not err.is_terminal:
        yield LogLines(description, unit, float(os.environ.get("LABELASSIST_PROGRESS_EVERY", 10)))
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               RateColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(description, total=None, unit=unit)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield on_progress


class LogLines:
    """on_progress for a log: `push: 1,500/4,000 tasks (38%), 212.4 tasks/s, about 12 s
    left`, at most once per `every` seconds, the rate counted since the first call."""

    def __init__(self, description: str, unit: str, every: float):
        self.description, self.unit, self.every = description, unit, every
        self.started = self.last = None
        self.first_done = 0

    def __call__(self, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if self.started is None:
            self.started, self.last, self.first_done = now, now, done
            return
        if now - self.last < self.every:
            return
        self.last = now
        rate = (done - self.first_done) / max(now - self.started, 1e-9)
        line = f"{self.description}: {done:,}"
        if total:
            line += f"/{total:,} {self.unit} ({done / total:.0%}), {rate:,.1f} {self.unit}/s"
            if rate > 0 and total > done:
                line += f", about {format_seconds((total - done) / rate)} left"
        else:
            line += f" {self.unit}, {rate:,.1f} {self.unit}/s"
        err.print(line, markup=False)


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def open_db(url: str, *, create: bool = False):
    """Only the commands that register images make a new database: any other command in
    the wrong folder would leave an empty labelassist.db behind and report zero files."""
    from ..db import open_database, sqlite_file

    path = sqlite_file(url)
    if not create and path is not None and not path.exists():
        raise DatabaseError(f"no labelassist database at {path}: run `labelassist ingest "
                            "FOLDER` (or `run`) to make one, pass --db, or work inside a "
                            "workspace (`labelassist init`)")
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
    """A client for the Label Studio that --ls-url names (its env var, or the workspace),
    refused before any request unless the token belongs there (send_token_home)."""
    from ..labelstudio import LabelStudioClient, resolve_connection

    token, whose = token_and_owner(token)
    connection = resolve_connection(url, token)
    send_token_home(connection.url, whose)
    return LabelStudioClient(connection,  # never wait in silence
                             on_retry=lambda line: err.print(line, markup=False))


def option_source(name: str) -> str | None:
    """Where an option's value came from: COMMANDLINE, ENVIRONMENT, DEFAULT_MAP (the
    workspace) or DEFAULT, as click's ParameterSource names it; None outside a command."""
    try:
        from typer._click.globals import get_current_context  # typer vendors click since 0.2x
    except ImportError:
        from click import get_current_context

    ctx = get_current_context(silent=True)
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source.name if source is not None else None


def token_and_owner(token):
    """The token, and whose it is: "flag" (--ls-token: it goes where the URL says), "env"
    (LABEL_STUDIO_API_KEY: LABEL_STUDIO_URL's) or "workspace" (its ls_token_file: the
    Label Studio that `labelassist studio` recorded beside it)."""
    if token and option_source("ls_token") != "ENVIRONMENT":
        return token, "flag"
    token = token or os.environ.get("LABEL_STUDIO_API_KEY")
    if token:
        return token, "env"
    if workspace is not None and "ls_token_file" in workspace.settings:
        return workspace.token(), "workspace"
    return None, "flag"


def send_token_home(url: str, whose: str) -> None:
    """Refuse, in one line naming what to pass, a token bound for a Label Studio it does
    not belong to (a labelassist.toml above here must not send it elsewhere)."""
    from ..errors import ConfigError
    from ..labelstudio.studio import token_owner

    if whose == "env":
        home = os.environ.get("LABEL_STUDIO_URL")
        if home is None and option_source("ls_url") != "COMMANDLINE":
            where = f"ls_url in {workspace.file}" if workspace is not None else "not --ls-url"
            raise ConfigError(f"LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL, so it is "
                              f"not sent to {url} ({where}): set LABEL_STUDIO_URL to the "
                              "Label Studio that token belongs to, or pass --ls-url")
        if home is not None and not same_origin(home, url):
            raise ConfigError(f"LABEL_STUDIO_API_KEY is the token of LABEL_STUDIO_URL ({home}), "
                              f"not of {url}: pass --ls-token with the token of {url}, or "
                              "leave --ls-url out")
    elif whose == "workspace":
        file = workspace.path("ls_token_file")
        home = token_owner(file)
        where = f"{file} (ls_token_file in {workspace.file})"
        if home is None:
            raise ConfigError(f"{where} does not say which Label Studio its token belongs to: "
                              "start `labelassist studio` again (it records that), or set "
                              "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        if not same_origin(home, url):
            raise ConfigError(f"the token in {where} belongs to the Label Studio at {home}, "
                              f"not to {url}: set LABEL_STUDIO_API_KEY or pass --ls-token with "
                              f"the token of {url}")


def same_origin(a: str, b: str) -> bool:
    from urllib.parse import urlsplit

    def origin(url):
        parts = urlsplit(url.strip())
        try:
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
        except ValueError:
            return parts.scheme.lower(), parts.netloc.lower(), None
        return parts.scheme.lower(), (parts.hostname or "").lower(), port

    return origin(a) == origin(b)


def resolve_model_id(model, label_set=None) -> str:
    """One order, the same as every other setting's: --model, else $LABELASSIST_MODEL,
    else the workspace's `model`, else the label file's, else DEFAULT_MODEL. The short
    name `toyworld` is the toy model shipped with labelassist (no hub needed)."""
    from_file = label_set.model if label_set is not None else None
    return model_source(model or os.environ.get("LABELASSIST_MODEL")
                        or (workspace.model if workspace is not None else None)
                        or from_file or DEFAULT_MODEL)


def model_source(name: str) -> str:
    """A model as load_model takes it: `toyworld` is unpacked from the weights shipped with
    labelassist into the cache (seconds, once); anything else is a hub id or a folder."""
    if name != TOY_MODEL or os.path.isdir(name):
        return name
    from ..toy.world import cached_model
    from ..workspace import cache_root

    return str(cached_model(cache_root(), log=lambda line: err.print(line,
                                                                           markup=False)))




# Register the verbs (in --help order).
from . import ingesting, predicting, outputs, labelstudio, trust, serving, db  # noqa: E402,F401
