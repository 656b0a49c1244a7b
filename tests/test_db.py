import pytest
from sqlalchemy import inspect, text

from labelassist.db import Database, open_database, schema_revision, upgrade_schema
from labelassist.errors import DatabaseError


def columns(db, table):
    return {c["name"] for c in inspect(db.engine).get_columns(table)}


def test_empty_database_upgrades_to_head(db):
    assert schema_revision(db) == "0004"
    tables = set(inspect(db.engine).get_table_names())
    assert {"images", "files", "model_versions", "embeddings", "predictions", "ls_projects",
            "ls_tasks", "ls_predictions", "annotations", "auto_accepts", "workers",
            "claims", "locks"} <= tables
    assert {"name", "holder", "hostname", "pid", "expires_at"} <= columns(db, "locks")
    assert {"sha256", "size_bytes", "width", "height", "error"} <= columns(db, "images")
    assert {"path", "raw_path", "image_id", "sha256", "size_bytes", "mtime_ns",
            "error"} <= columns(db, "files")
    assert {"label", "confidence", "margin", "scores", "model_version_id"} <= columns(
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

    assert schema_revision(db) == "0004"
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
    with pytest.raises(DatabaseError, match="not a database URL"):
        open_database("no-such-scheme")
    with pytest.raises(DatabaseError, match="cannot open database"):
        open_database(f"sqlite:///{tmp_path}/missing/dir/x.db")
