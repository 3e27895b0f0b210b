"""Alembic environment for chatkv's SQLite database.

chatkv runs Alembic programmatically (chatkv.store.db.upgrade): it passes an open
connection, already inside an IMMEDIATE transaction with foreign keys off, through
`config.attributes["connection"]`. Without one (a developer autogenerating a
revision), the URL from the config's `sqlalchemy.url` is used.
"""

from __future__ import annotations

from pathlib import Path

from alembic import context

from chatkv.store.db import make_engine
from chatkv.store.models import Base
from chatkv.store.search import include_object

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=True,
        compare_type=True,
        # The FTS5 tables (migration 0004) have no ORM model: leave them out of autogenerate.
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url or not url.startswith("sqlite:///"):
        raise RuntimeError("set sqlalchemy.url to sqlite:///PATH, or pass a connection in config.attributes")
    engine = make_engine(Path(url.removeprefix("sqlite:///")), foreign_keys=False, pooled=False)
    try:
        with engine.connect() as conn, conn.begin():
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    # chatkv never emits SQL scripts; its migrations run on open.
    raise RuntimeError("offline (--sql) mode is not supported")
run_migrations_online()
