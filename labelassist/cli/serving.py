"""The verb that keeps the model in Label Studio's loop: serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..labels import DEFAULT_DB
from . import DbOpt, DeviceOpt, LsTokenOpt, LsUrlOpt, ModelOpt, command, err, ls_client, open_db

ProjectOpt = Annotated[Optional[str], typer.Option(
    help="Id or title of the Label Studio project to serve: any project the token can "
    "read, pushed by labelassist or not (default: the one labelassist pushed to last).")]
ServeLabelsOpt = Annotated[Optional[Path], typer.Option(
    "--labels", "-l", help="Label file (TOML) describing the project's choices: its "
    "classes must be the choices of the project's labeling config ('other' means none of "
    "these). Default: what labelassist pushed, else each choice described by its name.")]
ConnectOpt = Annotated[bool, typer.Option(
    help="Connect the project to this server through Label Studio's API (its ML backend and "
    "webhook).")]
LearnEveryOpt = Annotated[int, typer.Option(
    min=0, help="Run learn after this many new reviews; when the probe wins, its "
    "predictions go to Label Studio as a new model_version (0: never).")]
SecretOpt = Annotated[Optional[str], typer.Option(
    envvar="LABELASSIST_SERVE_SECRET", help="Shared secret that Label Studio must send "
    "(basic auth, user 'labelassist'); at least 16 characters. The project webhook gets "
    "a credential derived from it, good for /webhook only. Default: one made on first "
    "use and kept in ~/.local/share/labelassist/serve-secret (mode 0600).")]
FetchDirOpt = Annotated[Optional[Path], typer.Option(
    help="Where images fetched through Label Studio are kept (default: "
    "labelassist-fetched beside an SQLite database).")]


@command()
def serve(
    db: DbOpt = DEFAULT_DB,
    ls_url: LsUrlOpt = None,
    ls_token: LsTokenOpt = None,
    project: ProjectOpt = None,
    labels: ServeLabelsOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 9090,
    url: Annotated[Optional[str], typer.Option(
        help="The address Label Studio should call (default: http://HOST:PORT).")] = None,
    learn_every: LearnEveryOpt = 20,
    secret: SecretOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    connect: ConnectOpt = True,
    fetch_dir: FetchDirOpt = None,
) -> None:
    """Keep the model in the loop: a Label Studio ML backend for a project, whether
    labelassist pushed it or it was made in Label Studio (its classes are then the
    choices of its labeling config). When a reviewer opens a task, Label Studio asks it
    for a prediction: pushed tasks are answered from the ledger at once; other tasks have
    their image fetched through Label Studio (a cloud storage's presigned link is followed
    without the token), encoded and predicted. Reviews are recorded as they are made (no
    pull needed), and every --learn-every reviews learn runs: when the probe wins, the
    next task a reviewer opens shows its better guess.

    GET / on the server reports reviews recorded, the last learn (cross-validated
    accuracy of the probe against zero-shot) and the share that accept would now take.

    Example: labelassist serve --project "labelassist: cat / dog"
    Any project: labelassist serve --project 12 --labels labels.toml --model DIR
    """
    from ..serve import ServeOptions, serve_secret

    secret = serve_secret(secret, log=lambda line: err.print(line, markup=False))
    database = open_db(db)
    client = ls_client(ls_url, ls_token)
    backend = make_backend(database, client, db, project, labels, model, device, fetch_dir,
                           learn_every)
    serve_until_stopped(backend, secret, ServeOptions(host, port, url, learn_every, connect))


def serve_until_stopped(backend, secret: str, options) -> None:
    """Answer Label Studio until Ctrl-C or SIGTERM."""
    import signal

    from ..serve import run_server

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_server(backend, secret, options, log=lambda line: err.print(line, markup=False))
    except KeyboardInterrupt:
        err.print("stopped", markup=False)


def make_backend(database, client, db, project, labels, model, device, fetch_dir,
                 learn_every):
    """The Backend for the project that --project names, its reviews caught up first."""
    from ..labels import load_label_file
    from ..labelstudio import pull as run_pull
    from ..labelstudio.project import FROM_NAME
    from ..model.load import load_model
    from ..serve import Backend, fetch_dir_for, find_project, status_file_for
    from ..serve.project import pin_zero_shot, project_control, served_label_set
    from . import model_source, resolve_model_id

    target = find_project(database, client, project)
    control = project_control(client, target)

    def loader(model_id: str, runtime: str = ""):
        # the zero-shot version's own model and runtime (its embeddings are keyed by
        # both), unless --model says otherwise
        return load_model(model_source(model) if model else model_id,
                          device="cpu" if runtime else device,
                          dtype=runtime or "auto")

    backend = Backend(database, client, target, load_model=loader,
                      fetch_dir=(fetch_dir or fetch_dir_for(db)).absolute(),
                      learn_every=learn_every, log=lambda line: err.print(line, markup=False),
                      status_file=status_file_for(db), control=control)
    if labels is not None or backend.zero_shot_version() is None:
        label_set = served_label_set(control, load_label_file(labels) if labels else None,
                                     target.title)
        backend.pin(*pin_zero_shot(database, label_set,
                                   lambda chosen: loader(resolve_model_id(model, chosen))))
    # reviews made while no server was listening (pull reads labelassist's own control)
    caught_up = backend.journal.catch_up() if control.from_name != FROM_NAME else None
    pulled = run_pull(database, client)
    new, updated, deleted = (pulled.new + getattr(caught_up, "new", 0),
                             pulled.updated + getattr(caught_up, "updated", 0),
                             pulled.deleted + getattr(caught_up, "deleted", 0))
    if new or updated or deleted:
        err.print(f"caught up: {new:,} new, {updated:,} updated, {deleted:,} deleted "
                  "reviews since the last pull", markup=False)
    return backend
