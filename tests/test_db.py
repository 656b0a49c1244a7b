import pytest
from sqlalchemy import inspect, text

from labelassist.db import Database, open_database, schema_revision, upgrade_schema
from labelassist.errors import DatabaseError


def columns(db, table):
    return {c["name"] for c in inspect(db.engine).get_columns(table)}


def test_empty_database_upgrades_to_head(db):
    assert schema_revision(db) == "0010"
    tables = set(inspect(db.engine).get_table_names())
    assert {"images", "files", "model_versions", "embeddings", "predictions", "ls_projects",
            "ls_tasks", "ls_predictions", "annotations", "auto_accepts", "workers",
            "claims", "locks", "ls_review_events", "suggestions", "runtime_choices",
            "ls_deleted_tasks"} <= tables
    assert {"model_key", "label_fingerprint", "cpu", "software", "runtime",
            "measurement"} <= columns(db, "runtime_choices")
    assert {"project_id", "tasks", "orphans", "expect", "received_at", "done_at",
            "attempts"} <= columns(db, "ls_review_events")
    assert {"name", "holder", "hostname", "pid", "expires_at"} <= columns(db, "locks")
    assert {"project_id", "image_id", "ls_task_id", "image_key"} <= columns(db, "ls_tasks")
    assert {"project_id", "image_id", "ls_task_id", "deleted_at"} <= columns(
        db, "ls_deleted_tasks")
    assert {"sha256", "size_bytes", "width", "height", "error"} <= columns(db, "images")
    assert {"path", "raw_path", "image_id", "sha256", "size_bytes", "mtime_ns", "etag",
            "error"} <= columns(db, "files")
    assert {"label", "confidence", "margin", "scores", "similarity", "model_version_id"} <= columns(
        db, "predictions")


def test_older_database_is_upgraded_on_open(db_url):
    old = Database(db_url)
    upgrade_schema(old, "0001")
    with old.engine.begin() as conn:
        conn.execute(text("INSERT INTO images (sha256, size_bytes, width, height, created_at) "
                          "VALUES ('ab', 1, 2, 3, '2026-01-01')"))
    assert "claims" not in inspect(old.engine).get_table_names()
    old.dispose()

    db = open_database(db_url)

    assert schema_revision(db) == "0010"
    assert {"model_version_id", "image_id", "worker_id", "expires_at"} <= columns(db, "claims")
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT sha256 FROM images")).scalar() == "ab"


def test_newer_database_is_refused(db_url):
    db = open_database(db_url)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0999_from_the_future'"))
    db.dispose()
    with pytest.raises(DatabaseError, match="newer labelassist.*pip install -U"):
        open_database(db_url)


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(db):
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_reader_is_not_blocked_by_an_open_write_transaction(db):
    with db.write() as writer:
        writer.execute(text("INSERT INTO images (sha256, size_bytes, width, height, created_at)"
                            " VALUES ('x', 1, 1, 1, '2026-01-01')"))
        with db.read() as reader:  # WAL: sees the last commit, does not wait
            assert reader.execute(text("SELECT count(*) FROM images")).scalar() == 0


def test_unusable_url_gives_a_clear_error(tmp_path):
    """A string without :// is a file path now (item 8); a URL still has to make sense."""
    with pytest.raises(DatabaseError, match="'nosuchdialect://x' is not a database URL"):
        open_database("nosuchdialect://x")
    with pytest.raises(DatabaseError, match="'://x' is not a database URL"):
        open_database("://x")
    with pytest.raises(DatabaseError, match="cannot open database"):
        open_database(f"sqlite:///{tmp_path}/missing/dir/x.db")


def test_opening_a_ledger_again_in_one_process_keeps_other_processes_from_its_wal(db_url,
                                                                                  tmp_path):
    """A process that holds the ledger open (serve, worker, run) and opens it again must
    keep its SQLite locks. Before: the not-SQLite check read the header with open() and
    close(), and closing any descriptor of a file drops all of a process's POSIX locks on
    it; the next process to close the ledger then thought it was the last one and deleted
    the WAL and its index under us, and everything this process wrote or read after that
    went to files no one else could see."""
    import subprocess
    import sys

    from sqlalchemy import select

    from labelassist.db.models import ModelVersion

    holder = open_database(db_url)
    with holder.write() as s:
        s.add(ModelVersion(name="before", model_id="m", model_key="k", label_set={}))
    open_database(db_url).dispose()  # opened again, e.g. by `run` after its ingest

    subprocess.run([sys.executable, "-c", "import sys; from labelassist.db import "
                    "open_database; open_database(sys.argv[1]).dispose()", db_url], check=True)
    wal = tmp_path / "labelassist.db-wal"
    assert wal.exists()  # another process closing must not delete the WAL we hold

    subprocess.run([sys.executable, "-c", (
        "import sys\nfrom labelassist.db import open_database\n"
        "from labelassist.db.models import ModelVersion\n"
        "db = open_database(sys.argv[1])\n"
        "with db.write() as s:\n"
        "    s.add(ModelVersion(name='other', model_id='m', model_key='k', label_set={}))\n"),
        db_url], check=True)
    with holder.read() as s:  # what another process wrote is seen here
        assert sorted(s.scalars(select(ModelVersion.name))) == ["before", "other"]


@pytest.mark.parametrize("args", [["status"], ["ingest", "{photos}"]])
def test_another_programs_database_is_refused_and_left_byte_for_byte(tmp_path, photo_dir,
                                                                     args):
    """Before: `status --db sqlite:///<Label Studio's database>` exited 0 after adding
    labelassist's tables to it (83 -> 101 tables)."""
    import hashlib
    import sqlite3

    from typer.testing import CliRunner

    from labelassist.cli import app

    foreign = tmp_path / "label_studio.sqlite3"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE task (id INTEGER PRIMARY KEY, data TEXT)")
        conn.execute("INSERT INTO task (data) VALUES ('{}')")
    conn.close()
    before = hashlib.sha256(foreign.read_bytes()).hexdigest()

    result = CliRunner().invoke(app, [a.format(photos=photo_dir) for a in args]
                                + ["--db", f"sqlite:///{foreign}"], env={"LABELASSIST_DB": None})

    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [(
        f"error: {foreign} is not a labelassist database (it has tables and no labelassist "
        "schema revision): check --db or LABELASSIST_DB, or give a new file name")]
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("label_studio")) \
        == ["label_studio.sqlite3"]  # no -wal or -shm left beside it


def test_a_plain_path_is_an_sqlite_file_everywhere(tmp_path, monkeypatch, photo_dir):
    """Before: `--db labelassist.db` said "not a database URL", while the workspace file
    and `init --db` took a plain path."""
    from typer.testing import CliRunner

    from labelassist.cli import app

    monkeypatch.chdir(tmp_path)
    env = {"LABELASSIST_DB": None}
    runner = CliRunner()

    ingested = runner.invoke(app, ["ingest", str(photo_dir), "--db", "mine.db"], env=env)
    status = runner.invoke(app, ["status", "--db", str(tmp_path / "mine.db")], env=env)
    from_env = runner.invoke(app, ["status"], env={"LABELASSIST_DB": "mine.db"})
    missing = runner.invoke(app, ["status", "--db", "nope.db"], env=env)

    assert ingested.exit_code == 0, ingested.output
    assert (tmp_path / "mine.db").is_file()
    assert status.exit_code == 0 and "files: 24" in status.output, status.output
    assert from_env.exit_code == 0 and "files: 24" in from_env.output, from_env.output
    assert missing.exit_code == 1
    assert f"no labelassist database at {tmp_path / 'nope.db'}" in missing.output
    db = open_database(str(tmp_path / "mine.db"))  # the Python API too
    assert schema_revision(db) == "0010"
    db.dispose()
