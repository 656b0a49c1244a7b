"""Copy a workspace into another database (SQLite -> PostgreSQL when a team outgrows one
machine). The target gets the schema from the same Alembic revisions; rows keep their
ids, so embeddings, predictions and Label Studio links stay joined."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, select

from ..errors import DatabaseError
from . import Database, open_database
from .models import Base, Image

CHUNK = 2000


def copy_database(source: Database, target_url: str,
                  on_progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    target = open_database(target_url)
    with target.read() as s:
        if s.scalar(select(func.count()).select_from(Image)):
            raise DatabaseError(f"{target.engine.url.render_as_string()} already holds images: "
                                "migrate into an empty database")
    tables = Base.metadata.sorted_tables  # parents before children
    with source.read() as s:
        totals = {t.name: s.scalar(select(func.count()).select_from(t)) for t in tables}
    grand, done, copied = sum(totals.values()), 0, {}
    for table in tables:
        key = list(table.primary_key.columns)
        with source.engine.connect() as src, target.engine.begin() as dst:
            last = None
            while True:
                query = select(table).order_by(*key).limit(CHUNK)
                if last is not None:
                    query = query.where(_after(key, last))
                rows = [dict(r._mapping) for r in src.execute(query)]
                if not rows:
                    break
                dst.execute(table.insert(), rows)
                last = tuple(rows[-1][c.name] for c in key)
                done += len(rows)
                if on_progress:
                    on_progress(done, grand)
        copied[table.name] = totals[table.name]
    if target.engine.dialect.name == "postgresql":
        _reset_sequences(target, tables)
    target.dispose()
    return copied


def _after(key, last):
    from sqlalchemy import tuple_

    return key[0] > last[0] if len(key) == 1 else tuple_(*key) > tuple_(*last)


def _reset_sequences(db: Database, tables) -> None:
    """Copied ids were inserted explicitly: move each sequence past them."""
    with db.engine.begin() as conn:
        for table in tables:
            if "id" in table.c and table.c.id.autoincrement in (True, "auto"):
                top = select(func.coalesce(func.max(table.c.id), 0)).scalar_subquery()
                conn.execute(select(func.setval(func.pg_get_serial_sequence(table.name, "id"),
                                                top + 1, False)))
