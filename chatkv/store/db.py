"""Opening the SQLite database: connection settings, and the upgrade to the newest schema.

Every connection runs in WAL mode with foreign keys on and a 30 s busy timeout.
pysqlite's own transaction handling is switched off and each transaction starts
with an explicit BEGIN: DEFERRED for reads, IMMEDIATE for writes. A write that
takes its lock up front waits (busy timeout) for another writer; one that starts
as a read and upgrades later fails at once with "database is locked" instead.

Alembic is imported only when the schema is not at SCHEMA_HEAD: importing it costs
about 150 ms, and a database at head (every start but the first after an upgrade)
needs nothing from it.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, exc, text
from sqlalchemy.pool import NullPool

from chatkv.errors import ChatKVError
from chatkv.paths import ensure_private_dir, package_file

if TYPE_CHECKING:
    from alembic.config import Config

# The newest revision in migrations/versions. A test checks that it matches
# Alembic's head; bump it together with each new migration.
SCHEMA_HEAD = "0005"

BUSY_TIMEOUT_S = 30.0

# Execution option read by the "begin" listener: the BEGIN mode of a transaction.
BEGIN_MODE = "chatkv_begin"


def migrations_dir() -> Path:
    """The Alembic script directory (bundled in the wheel, top level in a checkout)."""
    return package_file("migrations")


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """A programmatic Alembic config (no alembic.ini): on `connection` if given, else on `url`."""
    from alembic.config import Config

    cfg = Config()
    # ConfigParser interpolates "%": a path or URL containing one must be escaped.
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _casefold(value: str | None) -> str | None:
    return value.casefold() if value is not None else None


def make_engine(path: Path, *, foreign_keys: bool = True, pooled: bool = True) -> Engine:
    """An engine on the SQLite file `path`, with chatkv's connection settings.

    Args:
        foreign_keys: turn enforcement on (off only while migrating: SQLite's table
            rebuilds would otherwise cascade deletes through the old table).
        pooled: keep connections open for reuse; False for one-off engines.
    """
    engine = create_engine(
        f"sqlite:///{path}",
        # isolation_level=None: pysqlite issues no BEGIN/COMMIT of its own; the
        # "begin" listener below decides how each transaction starts.
        connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S, "isolation_level": None},
        poolclass=None if pooled else NullPool,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        # synchronous stays FULL (the default): a commit is on disk when it returns,
        # and a message, unlike a cache chunk, cannot be rebuilt.
        dbapi_conn.execute("PRAGMA journal_mode = WAL")
        dbapi_conn.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        # Deleted rows are overwritten, not left readable in free pages: `chatkv rm` means gone.
        dbapi_conn.execute("PRAGMA secure_delete = ON")
        # Unicode-aware case folding for search (SQLite's lower() and LIKE fold ASCII only).
        dbapi_conn.create_function("chatkv_casefold", 1, _casefold, deterministic=True)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(BEGIN_MODE, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def writer(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions begin IMMEDIATE."""
    return engine.execution_options(**{BEGIN_MODE: "IMMEDIATE"})


def current_revision(conn: Connection) -> str | None:
    """The schema revision recorded in the database; None for an empty database."""
    has_table = conn.execute(
        text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'")
    ).first()
    if has_table is None:
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(path: Path, revision: str = "head") -> None:
    """Run the migrations on the database at `path` up to `revision`.

    The whole upgrade is one IMMEDIATE transaction: a second process opening the
    same new database waits, then finds it already upgraded. Raises ChatKVError when
    the database carries a revision this code does not know (made by a newer chatkv).
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    _create_private_file(path)
    engine = make_engine(path, foreign_keys=False, pooled=False)
    try:
        with engine.connect() as conn:
            conn.execution_options(**{BEGIN_MODE: "IMMEDIATE"})
            with conn.begin():
                rev = current_revision(conn)
                script = ScriptDirectory.from_config(alembic_config())
                if rev is not None and rev not in {s.revision for s in script.walk_revisions()}:
                    raise ChatKVError(
                        f"database {path} has schema revision {rev!r}, which this chatkv does not know: "
                        "it was written by a newer version; upgrade chatkv"
                    )
                command.upgrade(alembic_config(conn), revision)
                # Foreign keys were off while migrating; refuse to commit dangling rows.
                bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if bad:
                    raise ChatKVError(f"migrating {path} left rows with broken references: {bad[:5]}")
    finally:
        engine.dispose()


def _create_private_file(path: Path) -> None:
    ensure_private_dir(path.parent)
    # Created by us with mode 0600 before SQLite opens it; SQLite gives the -wal
    # and -shm files the database file's permissions. Only when it does not exist:
    # closing any descriptor of a file drops all of this process's POSIX locks on it,
    # including those of SQLite connections already open here — and a database whose
    # locks vanish can be checkpointed under our feet by another process (corruption).
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except FileExistsError:
        return
    os.close(fd)


# sqlite3 error names (Python 3.11+: exception.sqlite_errorname) by what the user should do.
_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")
_FULL = ("SQLITE_FULL",)
_READONLY = ("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")
_CANTOPEN = ("SQLITE_CANTOPEN",)
_DAMAGED = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def describe_db_error(e: BaseException, path: Path | None = None) -> str:
    """One line saying what a database error means and what to do about it.

    Only a damaged file is told to be moved aside: a full disk, a read-only directory
    or another process holding the lock leave a healthy database.
    """
    orig = getattr(e, "orig", None) or e
    name = getattr(orig, "sqlite_errorname", "") or ""
    text = str(orig).splitlines()[0] if str(orig) else type(orig).__name__
    where = f" ({path})" if path else ""
    if name.startswith(_BUSY) or "locked" in text:
        return (
            f"the database{where} is locked by another chatkv process; "
            "wait for it to finish (or close it) and retry"
        )
    if name.startswith(_FULL) or "disk is full" in text:
        return f"the disk holding the database{where} is full; free some space and retry"
    if name.startswith(_READONLY) or "readonly" in text or "read-only" in text:
        return f"the database{where} is read-only; check the permissions of the file and its directory"
    if name.startswith(_CANTOPEN) or "unable to open" in text:
        return f"cannot open the database{where}; check that its directory exists and is writable"
    if name.startswith(_DAMAGED) or "malformed" in text or "not a database" in text:
        return (
            f"the database{where} is damaged ({text}); move it aside to start a new one "
            "(the chunk cache can be rebuilt with `chatkv cache rebuild`)"
        )
    return f"database error{where}: {text}; retry, or run with --debug for details"


def open_database(path: Path) -> Engine:
    """Open (creating if needed) the database at `path`, upgraded to the newest schema.

    Raises ChatKVError naming the file when it is not a SQLite database or was
    written by a newer chatkv.
    """
    path = Path(path)
    _create_private_file(path)
    engine = make_engine(path)
    try:
        with engine.connect() as conn:
            rev = current_revision(conn)
        if rev != SCHEMA_HEAD:
            upgrade(path)
    except exc.DatabaseError as e:
        engine.dispose()
        raise ChatKVError(describe_db_error(e, path)) from e
    except BaseException:
        engine.dispose()
        raise
    return engine
