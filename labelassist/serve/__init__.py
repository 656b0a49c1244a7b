"""`labelassist serve`: a Label Studio ML backend backed by the ledger (see backend.py)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..db import sqlite_file
from ..errors import ConfigError, LabelStudioError
from ..workspace import data_root
from .backend import Backend
from .project import find_project

__all__ = ["Backend", "MIN_SECRET", "ServeOptions", "find_project", "fetch_dir_for",
           "run_server", "serve_secret", "status_file_for"]

MIN_SECRET = 16  # characters; what serve makes itself is 32


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 9090
    url: str | None = None  # what Label Studio calls; default http://host:port
    learn_every: int = 20
    connect: bool = True

    @property
    def public_url(self) -> str:
        return (self.url or f"http://{self.host}:{self.port}").rstrip("/")


def secret_file() -> Path:
    return data_root() / "serve-secret"


def serve_secret(given: str | None, *, log=lambda line: None) -> str:
    """The secret Label Studio must send: the one given (--secret, LABELASSIST_SERVE_SECRET),
    refused when short or empty, else the one kept in secret_file() (made on first use,
    and made again when a torn write left it empty)."""
    import secrets

    from ..labelstudio.studio import read_or_make_secret

    if given is not None:
        if len(given.strip()) < MIN_SECRET:
            raise ConfigError(f"--secret (or LABELASSIST_SERVE_SECRET) must be at least "
                              f"{MIN_SECRET} characters, not {len(given.strip())}: pass a "
                              f"longer one, or neither, to use the one kept in {secret_file()}")
        return given
    return read_or_make_secret(secret_file(), lambda: secrets.token_urlsafe(24),
                               min_length=MIN_SECRET, log=log)


def status_file_for(db_url: str) -> Path | None:
    """Where a server keeps its status for `labelassist status` (beside an SQLite ledger)."""
    path = sqlite_file(db_url)
    return None if path is None else path.parent / "labelassist-serve.json"


def fetch_dir_for(db_url: str) -> Path:
    """Where images fetched through Label Studio are kept: beside an SQLite ledger, else
    in the user's data folder."""
    path = sqlite_file(db_url)
    if path is not None:
        return path.parent / "labelassist-fetched"
    return data_root() / "fetched"


def run_server(backend: Backend, secret: str, options: ServeOptions, *, log=print,
               stop: threading.Event | None = None) -> None:
    """Serve until `stop` is set (or Ctrl-C); connect the project once the port answers."""
    import uvicorn

    from .app import make_app
    from .connect import connect

    config = uvicorn.Config(make_app(backend, secret), host=options.host, port=options.port,
                            log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    backend.start()
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            backend.stop()
            raise LabelStudioError(f"cannot listen on {options.host}:{options.port}: is the "
                                   "port taken? pass another --port")
        time.sleep(0.05)
    try:
        if options.connect:
            connect(backend.client, backend.project.ls_project_id, options.public_url,
                    secret)
            log(f"connected to {backend.client.conn.url}/projects/"
                f"{backend.project.ls_project_id} ({backend.project.title})")
        backend.save_status()
        log(f"serving {backend.project.title!r} at {options.public_url}: "
            f"{backend.status.model_version or 'no predictions yet'}; learns every "
            f"{options.learn_every} reviews (Ctrl-C to stop)")
        stop = stop or threading.Event()
        while thread.is_alive() and not stop.wait(0.5):
            pass
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        backend.stop()
