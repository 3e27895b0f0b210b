"""Opening the database (SQLite by default, or PostgreSQL by URL): connection settings,
and the upgrade to the newest schema.

`open_database` takes a path (SQLite, the default: `<data dir>/chatkv.db`) or a URL
(`[store] url`, CHATKV_STORE_URL: `postgresql://user@host/db`, or `sqlite:///PATH`).

SQLite: every connection runs in WAL mode with foreign keys on and a 30 s busy timeout.
pysqlite's own transaction handling is switched off and each transaction starts
with an explicit BEGIN: DEFERRED for reads, IMMEDIATE for writes. A write that
takes its lock up front waits (busy timeout) for another writer; one that starts
as a read and upgrades later fails at once with "database is locked" instead.

PostgreSQL keeps the same guarantees another way: a write transaction (`writer`) first
takes a transaction-scoped advisory lock (pg_advisory_xact_lock, one per database role:
each role works in a schema of its own, `user_schema`), so writers queue one after
another exactly as SQLite's IMMEDIATE transactions do, whichever host they run on;
a message's position (the next one after the last, read inside the transaction) is
therefore never taken twice. Writers run READ COMMITTED, so each statement after the lock
sees everything the previous writer committed; readers run REPEATABLE READ, a consistent
snapshot as SQLite's read transactions are. The upgrade holds another advisory lock, so
hosts opening a new database at once upgrade it once, one after the other.

Alembic is imported only when the schema is not at SCHEMA_HEAD: importing it costs
about 150 ms, and a database at head (every start but the first after an upgrade)
needs nothing from it.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, exc, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from chatkv.errors import ChatKVError, ConfigError
from chatkv.paths import db_path, ensure_private_dir, package_file

if TYPE_CHECKING:
    from alembic.config import Config

    from chatkv.config import Settings

# Where the database is: a SQLite file, or a URL string (see `as_target`).
Target = Path | str

# The newest revision in migrations/versions. A test checks that it matches
# Alembic's head; bump it together with each new migration.
SCHEMA_HEAD = "0006"

BUSY_TIMEOUT_S = 30.0

# Execution option read by the "begin" listener: the BEGIN mode of a transaction.
BEGIN_MODE = "chatkv_begin"

# PostgreSQL advisory locks (the same on every host): every write transaction takes
# (PG_WRITE_CLASS, hashtext of its namespace), so writers of one user's schema queue and
# other users' do not wait for them; the schema upgrade takes PG_UPGRADE_LOCK (64-bit keys
# and pairs of 32-bit keys are separate spaces). 0x63686174 is "chat".
PG_WRITE_CLASS = 0x63686174
PG_UPGRADE_LOCK = 0x6368617400000002
# A server that does not answer within this is reported as unreachable.
PG_CONNECT_TIMEOUT_S = 10


def as_target(target: Target) -> Target:
    """A database target as chatkv keeps it: a URL (anything with "://") stays a string,
    anything else is a SQLite file's path."""
    if isinstance(target, str) and "://" in target:
        return target
    return Path(target)


def database_target(settings: Settings) -> Target:
    """The database `settings` name: `store.url` when set, else the SQLite file in the data dir."""
    url = settings.get("store.url")
    return as_target(url) if url else db_path()


def sqlite_file(target: Target) -> Path | None:
    """The SQLite file a target names (a path, or a sqlite:///PATH URL); None for a server."""
    target = as_target(target)
    if isinstance(target, Path):
        return target
    if target.startswith("sqlite:///"):
        return Path(target.removeprefix("sqlite:///"))
    return None


def server_url(url: str) -> URL:
    """The SQLAlchemy URL of a PostgreSQL database (`postgresql://` means psycopg 3 here).

    Raises ConfigError for anything else, naming the URL without its password."""
    try:
        u = make_url(url)
    except Exception:  # ArgumentError, ValueError: the text is not a URL at all
        raise ConfigError(
            "store.url is not a database URL; use postgresql://USER@HOST/DB or sqlite:///PATH"
        ) from None
    if u.get_backend_name() != "postgresql" or u.get_driver_name() not in ("psycopg", "postgresql"):
        raise ConfigError(
            f"store.url {redacted(url)!r} names an unsupported database; "
            "use postgresql://USER@HOST/DB (psycopg) or sqlite:///PATH"
        )
    return u.set(drivername="postgresql+psycopg")


def redacted(target: Target) -> str:
    """A target as it may appear in a message or a log: a URL without its password."""
    if isinstance(target, Path) or "://" not in target:
        return str(target)
    try:
        return make_url(target).render_as_string(hide_password=True)
    except Exception:
        return target.split("://", 1)[0] + "://…"  # unparsable: say only which kind


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


def _use_wal(dbapi_conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode (it stays so: later connections find it done). Switching
    needs the file to itself, and SQLite answers "locked" at once, without its busy
    timeout, while another connection holds a write lock (two chatkv processes opening a new
    data directory together): so it is retried here, within the same timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    pause = 0.005
    while True:
        try:
            dbapi_conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            busy = getattr(e, "sqlite_errorcode", sqlite3.SQLITE_BUSY) == sqlite3.SQLITE_BUSY
            if not busy or "locked" not in str(e) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


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
        _use_wal(dbapi_conn)
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


def user_schema(role: str) -> str:
    """The schema holding a database role's conversations: one namespace per user of a
    shared database ("chatkv_" + the role, folded to what needs no quoting). A team shares
    conversations by connecting as one role."""
    return "chatkv_" + (re.sub(r"[^a-z0-9_]", "_", role.lower()) or "_")[:50]


def make_server_engine(url: str, *, pooled: bool = True) -> Engine:
    """An engine on the PostgreSQL database at `url`, with chatkv's connection settings:
    every connection works in its role's schema (`user_schema`; created by `upgrade`).

    Raises ConfigError when the URL is not PostgreSQL's or psycopg is not installed.
    """
    u = server_url(url)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigError(
            "store.url names a PostgreSQL database, which needs the psycopg driver: "
            "pip install 'chatkv[shared]'"
        ) from None
    engine = create_engine(
        u,
        poolclass=None if pooled else NullPool,
        # A pooled connection the server dropped (restart, failover) is replaced, not used.
        pool_pre_ping=True,
        # Readers see one snapshot per transaction, as in SQLite; writer() switches to READ
        # COMMITTED (each statement after the write lock sees the previous writer's commit).
        isolation_level="REPEATABLE READ",
        connect_args={
            "connect_timeout": PG_CONNECT_TIMEOUT_S,
            "application_name": "chatkv",
            # A writer waits for the write lock as long as SQLite's busy timeout, then fails
            # with "lock timeout" (described as "locked by another chatkv process").
            "options": f"-c lock_timeout={int(BUSY_TIMEOUT_S * 1000)}",
        },
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SELECT current_user")
            cur.execute(f"SET search_path TO {user_schema(cur.fetchone()[0])}")
        dbapi_conn.commit()  # SET is transactional; the pool wants a connection outside one

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(BEGIN_MODE) == "IMMEDIATE":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_WRITE_CLASS}, hashtext(current_user))")

    return engine


def writer(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions are writes: BEGIN IMMEDIATE on SQLite;
    on PostgreSQL, READ COMMITTED under the write advisory lock."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(**{BEGIN_MODE: "IMMEDIATE"}, isolation_level="READ COMMITTED")
    return engine.execution_options(**{BEGIN_MODE: "IMMEDIATE"})


def current_revision(conn: Connection) -> str | None:
    """The schema revision recorded in the database; None for an empty database."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def upgrade(path: Target, revision: str = "head") -> None:
    """Run the migrations on the database at `path` (a SQLite file or a URL) up to `revision`.

    The whole upgrade is one transaction holding the write lock (SQLite: IMMEDIATE;
    PostgreSQL: an advisory lock, DDL being transactional there): a second process, on
    this host or another, opening the same new database waits, then finds it already
    upgraded. Raises ChatKVError when the database carries a revision this code does not
    know (made by a newer chatkv).
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    sqlite = sqlite_file(path)
    if sqlite is not None:
        path = sqlite
        _create_private_file(path)
        engine = make_engine(path, foreign_keys=False, pooled=False)
    else:
        engine = make_server_engine(str(path), pooled=False)
    try:
        with engine.connect() as conn:
            conn.execution_options(**{BEGIN_MODE: "IMMEDIATE"})
            if sqlite is None:
                # Each statement sees what a host that upgraded first has committed.
                conn.execution_options(isolation_level="READ COMMITTED")
            with conn.begin():
                if sqlite is None:
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_UPGRADE_LOCK})")
                    role = conn.exec_driver_sql("SELECT current_user").scalar()
                    conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {user_schema(str(role))}")
                rev = current_revision(conn)
                script = ScriptDirectory.from_config(alembic_config())
                if rev is not None and rev not in {s.revision for s in script.walk_revisions()}:
                    raise ChatKVError(
                        f"database {redacted(path)} has schema revision {rev!r}, "
                        "which this chatkv does not know: it was written by a newer version; upgrade chatkv"
                    )
                command.upgrade(alembic_config(conn), revision)
                if sqlite is not None:
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


# PostgreSQL SQLSTATE codes (and classes) by what the user should do.
_PG_BUSY = ("55P03", "40001", "40P01", "57014")  # lock timeout, serialization, deadlock, cancelled
_PG_FULL = ("53100", "53200")  # disk full, out of memory
_PG_READONLY = ("25006", "42501", "28")  # read-only transaction, privilege, authentication (class 28)
_PG_UNREACHABLE = ("08", "57P")  # connection exceptions, server shutting down / restarting


def _describe_server_error(orig: BaseException, where: str) -> str:
    """describe_db_error for a psycopg error. Its text names host and port at most; a
    password is never part of it (psycopg does not repeat the connection string)."""
    code = getattr(orig, "sqlstate", None) or ""
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    where = where or " (store.url)"
    if code.startswith(_PG_BUSY):
        return (
            f"the database{where} is locked by another chatkv process; "
            "wait for it to finish (or close it) and retry"
        )
    if code.startswith(_PG_FULL):
        return f"the database server{where} is out of space ({text}); free some and retry"
    if code.startswith(_PG_READONLY):
        return f"the database{where} refused access ({text}); check the user's rights and credentials"
    if not code or code.startswith(_PG_UNREACHABLE):
        return (
            f"cannot reach the database server{where} ({text}); check that it runs and store.url, then retry"
        )
    return f"database error{where}: {text}; retry, or run with --debug for details"


def describe_db_error(e: BaseException, path: Path | str | None = None) -> str:
    """One line saying what a database error means and what to do about it.

    Only a damaged file is told to be moved aside: a full disk, a read-only directory
    or another process holding the lock leave a healthy database. A PostgreSQL error is
    described by its SQLSTATE; `path` then only names the database if it is a URL
    (shown without its password).
    """
    orig = getattr(e, "orig", None) or e
    if type(orig).__module__.startswith("psycopg"):
        where = f" ({redacted(path)})" if isinstance(path, str) and "://" in path else ""
        return _describe_server_error(orig, where)
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


def open_database(path: Target) -> Engine:
    """Open (creating if needed) the database at `path`, upgraded to the newest schema.

    `path` is a SQLite file, or a URL (`postgresql://…`, `sqlite:///…`; see `as_target`).
    Raises ChatKVError naming the file (a URL without its password) when it is not a
    database, cannot be reached, or was written by a newer chatkv.
    """
    sqlite = sqlite_file(path)
    if sqlite is not None:
        path = sqlite
        _create_private_file(path)
        engine = make_engine(path)
    else:
        engine = make_server_engine(str(path))
    try:
        with engine.connect() as conn:
            rev = current_revision(conn)
        if rev != SCHEMA_HEAD:
            upgrade(path)
    except exc.DatabaseError as e:
        engine.dispose()
        raise ChatKVError(describe_db_error(e, redacted(path) if sqlite is None else path)) from e
    except BaseException:
        engine.dispose()
        raise
    return engine
