"""Open a database: create or upgrade its schema, then hand out sessions.

SQLite runs in WAL mode with a busy timeout, so readers never block the writer.
Writers begin with BEGIN IMMEDIATE: they queue for the write lock up front
instead of failing when a read transaction tries to upgrade.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.exc import DatabaseError as SQLAlchemyDatabaseError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import DatabaseError
from .models import Base  # noqa: F401  (re-exported for callers)

SQLITE_BUSY_TIMEOUT_MS = 30_000
_MIGRATION_LOCK_KEY = 7_310_225_418  # PostgreSQL advisory lock serialising schema upgrades


def migrations_dir() -> str:
    """Top-level migrations/, installed as the package labelassist._migrations."""
    return str(resources.files("labelassist._migrations"))


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", migrations_dir())
    return cfg


URL_EXAMPLES = "give a file such as labelassist.db, or a URL such as postgresql+psycopg://host/db"


def database_url(url_or_path: str) -> str:
    """A database URL as given; a plain path (no ://) means an SQLite file, as it does
    in labelassist.toml and `init --db`."""
    if not url_or_path or "://" in url_or_path:
        return url_or_path
    return f"sqlite:///{Path(url_or_path).expanduser().absolute()}"


class Database:
    """An engine plus two session factories: `read()` and `write()`."""

    def __init__(self, url: str):
        self.url = url = database_url(url)
        try:
            parsed = make_url(url)
            parsed.get_dialect()
        except NoSuchModuleError:
            raise DatabaseError(f"--db {url!r} is not a database URL: SQLAlchemy knows no "
                                f"{parsed.drivername!r} ({URL_EXAMPLES})") from None
        except ArgumentError:
            raise DatabaseError(f"--db {url!r} is not a database URL ({URL_EXAMPLES})") from None
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}} if self.is_sqlite \
            else {"pool_pre_ping": True}
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (ArgumentError, ImportError) as exc:
            raise DatabaseError(f"cannot use --db {parsed.render_as_string()}: {exc}") from None
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(sqlite_immediate=True),
                                   expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error. Ctrl-C waits
        for its end (interrupts_deferred)."""
        with interrupts_deferred(), self._write() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside a write transaction is held until the transaction has committed or
    rolled back, then raised. A KeyboardInterrupt that lands inside the driver, between
    SQLite's BEGIN IMMEDIATE and SQLAlchemy noting it, left the write lock held, and every
    later write (the batch in flight, releasing the claims) failed 'database is locked'.
    Only in the main thread, and only where Python's own handler is in place (a command
    with a handler of its own, like the worker's graceful stop, keeps it)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        immediate = conn.get_execution_options().get("sqlite_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def sqlite_file(url: str) -> Path | None:
    """The file behind an SQLite URL or a plain path (None for another database, memory
    or a bad URL)."""
    try:
        parsed = make_url(database_url(url))
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).absolute()


def open_database(url: str) -> Database:
    """Open `url`, creating or upgrading its schema; refuse one written by a newer
    labelassist, and one another program wrote (tables but no labelassist revision)."""
    db = Database(url)
    _refuse_a_file_that_is_not_a_ledger(db)
    try:
        upgrade_schema(db)
    except SQLAlchemyDatabaseError as exc:  # OperationalError included
        db.dispose()
        raise DatabaseError(f"cannot open database {db.engine.url.render_as_string()}: "
                            f"{exc.orig}. Check --db or LABELASSIST_DB.") from None
    except DatabaseError:
        db.dispose()
        raise
    return db


def _refuse_a_file_that_is_not_a_ledger(db: Database) -> None:
    """Opening a text file or a spreadsheet as SQLite would fail deep inside, after
    creating -wal and -shm files next to it; another program's SQLite file would be
    switched to WAL and migrated. Ask SQLite itself, read-only, first, so that either is
    left byte for byte. Never open() the file directly: closing any descriptor of a file
    drops all of this process's POSIX locks on it, and a process that already holds the
    ledger open would lose the locks that keep other processes from deleting its WAL."""
    import sqlite3

    path = db.engine.url.database if db.is_sqlite else None
    if not path or path == ":memory:" or not os.path.isfile(path) \
            or os.path.getsize(path) == 0:
        return
    probe = None
    try:
        probe = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True)
        tables = {name for (name,) in probe.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        revision = probe.execute("SELECT version_num FROM alembic_version").fetchone() \
            if "alembic_version" in tables else None
    except sqlite3.DatabaseError as exc:
        if "not a database" not in str(exc):
            raise
        db.dispose()
        raise DatabaseError(f"{path} is not a labelassist database (not an SQLite file): "
                            "check --db or LABELASSIST_DB, or give a new file name") from None
    finally:
        if probe is not None:
            probe.close()
    if revision is None and tables - {"alembic_version"}:
        db.dispose()
        raise DatabaseError(_not_a_ledger(path))


def _not_a_ledger(where: str) -> str:
    return (f"{where} is not a labelassist database (it has tables and no labelassist "
            "schema revision): check --db or LABELASSIST_DB, or give a new file name")


def upgrade_schema(db: Database, revision: str = "head") -> None:
    cfg = alembic_config()
    script = ScriptDirectory.from_config(cfg)
    known = {rev.revision for rev in script.walk_revisions()}
    head = script.get_current_head()
    engine = db.engine.execution_options(sqlite_immediate=True)
    with engine.connect() as conn:
        if _current_revision(conn) == head and revision == "head":
            return  # the common case: no lock, no Alembic run
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        current = _current_revision(conn)
        if current is None and set(inspect(conn).get_table_names()) - {"alembic_version"}:
            raise DatabaseError(_not_a_ledger(db.engine.url.render_as_string()))
        if current is not None and current not in known:
            raise DatabaseError(
                f"database {db.engine.url.render_as_string()} was written by a newer "
                f"labelassist (schema revision {current}; this one knows up to {head}). "
                "Upgrade labelassist: pip install -U labelassist")
        if current == head and revision == "head":
            return
        from alembic import command

        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _current_revision(conn) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def schema_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return _current_revision(conn)


def insert_ignoring_duplicates(session: Session, model, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL: a rerun after a crash
    may meet rows that the crashed run already committed."""
    if not rows:
        return
    if session.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(model).on_conflict_do_nothing(), rows)


_TRANSIENT = ("server closed the connection", "terminating connection", "connection refused",
              "could not connect", "connection reset", "database is locked",
              "connection is closed", "the database system is", "consuming input failed")


def is_transient(exc: Exception) -> bool:
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    text = str(getattr(exc, "orig", exc)).lower()
    return any(marker in text for marker in _TRANSIENT)


def retrying(db: Database, fn, *args, attempts: int = 6, **kwargs):
    """Run a transaction function, retrying when the database went away (PostgreSQL
    restarted, connection cut) or stayed locked. The function must be idempotent, as every
    worker transaction is (insert-ignore, claims)."""
    import time

    from sqlalchemy.exc import DBAPIError

    delay = 0.5
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts - 1:
                first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                raise DatabaseError(f"lost the database ({first}) and could not reconnect; "
                                    "run the same command again to resume") from None
            db.engine.dispose()  # drop pooled connections to the dead server
            time.sleep(delay)
            delay = min(delay * 2, 8)
