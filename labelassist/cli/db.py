"""Database maintenance: db migrate-to."""

from __future__ import annotations

from typing import Annotated

import typer

from ..labels import DEFAULT_DB
from . import DbOpt, app, err, handles_errors, open_db, progress_bar

db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
@db_app.command("migrate-to")
@handles_errors
def migrate_to(
    url: Annotated[str, typer.Argument(help="Target database URL, e.g. "
                                       "postgresql+psycopg://user@host/labels (empty).")],
    db: DbOpt = DEFAULT_DB,
) -> None:
    """Copy this workspace (images, embeddings, predictions, reviews, Label Studio links)
    into another, empty database: how a team moves from SQLite to PostgreSQL.

    Example: labelassist db migrate-to postgresql+psycopg://me@dbhost/labels
    """
    from ..db.copy import copy_database

    with progress_bar("copy", unit="rows") as on_progress:
        copied = copy_database(open_db(db), url, on_progress=on_progress)
    err.print("copied " + ", ".join(f"{n:,} {t}" for t, n in copied.items() if n)
              + f". Now use --db {url}", markup=False)


