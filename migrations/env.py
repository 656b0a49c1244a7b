"""Alembic environment. labelassist runs it on every open (labelassist.db.migrate);
developers can also run `alembic -c alembic.ini ...` with LABELASSIST_DB set."""

import os

from alembic import context
from sqlalchemy import create_engine

from labelassist.db.models import Base

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = os.environ.get("LABELASSIST_DB", "sqlite:///labelassist.db")
    with create_engine(url).connect() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline SQL generation is not supported; run against a database")
run_migrations_online()
