"""The verb that keeps the model in Label Studio's loop: serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..labels import DEFAULT_DB
from . import DbOpt, DeviceOpt, LsTokenOpt, LsUrlOpt, ModelOpt, command, err, ls_client, open_db

ProjectOpt = Annotated[Optional[str], typer.Option(
    help="Title of the project to serve (default: the one labelassist pushed to last).")]
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
    """Keep the model in the loop: a Label Studio ML backend for a project labelassist
    pushed. When a reviewer opens a task, Label Studio asks it for a prediction: pushed
    tasks are answered from the ledger at once; tasks imported straight into Label Studio
    have their image fetched through Label Studio, encoded and predicted. Reviews are
    recorded as they are made (no pull needed), and every --learn-every reviews learn
    runs: when the probe wins, the next task a reviewer opens shows its better guess.

    GET / on the server reports reviews recorded, the last learn (cross-validated
    accuracy of the probe against zero-shot) and the share that accept would now take.

    Example: labelassist serve --project "labelassist: cat / dog"
    """
    from ..serve import ServeOptions, serve_secret

    secret = serve_secret(secret, log=lambda line: err.print(line, markup=False))
    database = open_db(db)
    client = ls_client(ls_url, ls_token)
    backend = make_backend(database, client, db, project, model, device, fetch_dir,
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


def make_backend(database, client, db, project, model, device, fetch_dir, learn_every):
    """The Backend for the project that --project names, its reviews caught up first."""
    from ..labelstudio import pull as run_pull
    from ..model.load import load_model
    from ..serve import Backend, fetch_dir_for, find_project, status_file_for

    target = find_project(database, client, project)
    caught_up = run_pull(database, client)  # reviews made while no server was listening
    if caught_up.new or caught_up.updated or caught_up.deleted:
        err.print(f"caught up: {caught_up.new:,} new, {caught_up.updated:,} updated, "
                  f"{caught_up.deleted:,} deleted reviews since the last pull", markup=False)

    def loader(model_id: str, runtime: str = ""):
        # the zero-shot version's own model and runtime (its embeddings are keyed by
        # both), unless --model says otherwise
        return load_model(model or model_id, device="cpu" if runtime else device,
                          dtype=runtime or "auto")

    return Backend(database, client, target, load_model=loader,
                   fetch_dir=(fetch_dir or fetch_dir_for(db)).absolute(),
                   learn_every=learn_every, log=lambda line: err.print(line, markup=False),
                   status_file=status_file_for(db))
