"""Real database and object-store servers for the tests of sharing across machines, started
by the tests themselves on this machine only: PostgreSQL from the `pgserver` wheel (its own
binaries, listening on a Unix socket in its data directory, no TCP port) and moto's S3
server on 127.0.0.1. Both come with the `dev` extra (pyproject.toml)."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def pg_data_dir() -> Path:
    """A new directory for a server's data, directly under the system's temporary directory:
    as root, pgserver runs the server as its own user, who must be able to reach it — and
    pytest's base temporary directory is private to root (a concurrent pytest session
    makes it so again, even after pgserver opened it up)."""
    return Path(tempfile.mkdtemp(prefix="chatkv-pg-"))


def start_postgres(data_dir: Path) -> Any:
    """A running PostgreSQL server with its data in `data_dir` (stopped by .cleanup()).

    Without fsync: nothing here must survive a power cut, and every test's new database
    otherwise costs its files' fsyncs at the shutdown checkpoint (measured: over a minute
    for the store tests' databases on a loaded 2-core machine)."""
    import pgserver
    import sqlalchemy as sa

    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    admin = sa.create_engine(_psycopg(server.get_uri()), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for setting in ("fsync = off", "synchronous_commit = off", "full_page_writes = off"):
                conn.exec_driver_sql(f"ALTER SYSTEM SET {setting}")
            conn.exec_driver_sql("SELECT pg_reload_conf()")
    finally:
        admin.dispose()
    return server


def new_database(server: Any, migrated: bool = False) -> str:
    """A fresh database on `server`; its psycopg URL. Empty, or `migrated`: a copy of one
    upgraded to the newest schema once per server (CREATE DATABASE … TEMPLATE copies
    files: much cheaper than running the migrations for every test)."""
    import sqlalchemy as sa

    name = "t" + uuid.uuid4().hex[:12]
    template = ""
    if migrated:
        if not getattr(server, "_chatkv_template", None):
            from chatkv.store import Store

            server._chatkv_template = new_database(server)
            Store(server._chatkv_template).close()  # no connection may stay open on a template
        template = f' TEMPLATE "{sa.engine.make_url(server._chatkv_template).database}"'
    admin = sa.create_engine(_psycopg(server.get_uri()), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"{template}')
    finally:
        admin.dispose()
    return _psycopg(server.get_uri(name))


def _psycopg(uri: str) -> str:
    return uri.replace("postgresql://", "postgresql+psycopg://", 1)


def postgres() -> Iterator[Any]:
    """Body of a session-scoped fixture: one server for the whole run."""
    data = pg_data_dir()
    server = start_postgres(data)
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


def s3(port: int = 0) -> Iterator[str]:
    """Body of a session-scoped fixture: moto's threaded S3 server on 127.0.0.1; yields its
    endpoint URL. Credentials are dummies set for the test process by the caller."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        host, real_port = server.get_host_and_port()
        yield f"http://{host}:{real_port}"
    finally:
        server.stop()
