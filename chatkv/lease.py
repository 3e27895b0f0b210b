"""One turn at a time per conversation, across processes.

Two chatkv processes continuing one conversation at once would interleave it: each
prompt would include the other's question and no reply would follow its own. A turn
therefore holds an exclusive lock on the conversation for as long as it runs: an
advisory `flock` on a small file under the data dir, which the kernel releases when the
holder exits, however it exits (SIGKILL included), so a crash never leaves it stuck.

With conversations on PostgreSQL ([store] url) the hosts sharing them each have their own
data dir, so a file lock would hold on one host only. There the lease is a session-level
advisory lock on the server (`pg_try_advisory_lock`, keyed by the database role and the
conversation id) on a connection kept for the lease: the server releases it when the
lease ends or when that connection dies (the holder killed, its host gone), so it never
stays stuck either. SQLite keeps the file lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from chatkv.errors import ChatKVError
from chatkv.paths import data_dir, ensure_private_dir

WAIT_S = 3.0  # how long a second turn waits for the first before saying "busy"
_POLL_S = 0.05


class BusyError(ChatKVError):
    """Another process (or another turn of this one) is generating in the conversation."""


def _lock_path(conversation_id: int) -> Path:
    return ensure_private_dir(data_dir() / "locks") / f"conversation-{int(conversation_id)}.lock"


# The advisory lock of a conversation's lease: (hashtext of this text and the role, the
# conversation id as a 32-bit integer). Each role has its own conversations (store/db.py
# user_schema), so the role is part of the key.
_PG_LEASE_KEY = "hashtext('chatkv lease ' || current_user), CAST(:id AS integer)"


def _pg_id(conversation_id: int) -> int:
    """The conversation id folded into PostgreSQL's signed 32-bit integer."""
    return ((int(conversation_id) + 2**31) % 2**32) - 2**31


class Lease:
    """An exclusive hold on one conversation; `release()` (or garbage collection) ends it.
    It holds a lock file's descriptor (SQLite) or a database connection (PostgreSQL)."""

    def __init__(self, conversation_id: int, fd: int | None = None, conn: Any = None):
        self.conversation_id = conversation_id
        self._fd: int | None = fd
        self._conn: Any = conn  # a SQLAlchemy Connection holding the advisory lock

    @property
    def held(self) -> bool:
        return self._fd is not None or self._conn is not None

    def release(self, forget: bool = False) -> None:
        """End the hold; `forget` also removes the lock file (the conversation is gone)."""
        fd, self._fd = self._fd, None
        conn, self._conn = self._conn, None
        if conn is not None:
            _unlock(conn, self.conversation_id)
        if fd is None:
            return
        if forget:
            _lock_path(self.conversation_id).unlink(missing_ok=True)
        os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _busy(conversation_id: int) -> BusyError:
    return BusyError(
        f"conversation {conversation_id} is busy: another chatkv process is generating a "
        "reply in it; wait for that reply to finish and retry"
    )


def _unlock(conn: Any, conversation_id: int) -> None:
    """Give the advisory lock back and the connection to the pool; when that fails, close
    the connection for good: the server then drops the lock with it."""
    try:
        conn.execute(_text(f"SELECT pg_advisory_unlock({_PG_LEASE_KEY})"), {"id": _pg_id(conversation_id)})
        conn.close()
    except Exception:
        try:
            conn.invalidate()
            conn.close()
        except Exception:  # the connection is gone already, and the lock with it
            pass


def _text(sql: str) -> Any:
    from sqlalchemy import text

    return text(sql)


def _acquire_server(conversation_id: int, wait_s: float, engine: Any) -> Lease:
    """The lease as a PostgreSQL advisory lock held by a connection of its own (autocommit:
    no transaction stays open for the turn's length)."""
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        deadline = time.monotonic() + wait_s
        try_lock = _text(f"SELECT pg_try_advisory_lock({_PG_LEASE_KEY})")
        while not conn.execute(try_lock, {"id": _pg_id(conversation_id)}).scalar():
            if time.monotonic() >= deadline:
                raise _busy(conversation_id)
            time.sleep(_POLL_S)
    except BaseException:
        conn.close()
        raise
    return Lease(conversation_id, conn=conn)


def acquire(conversation_id: int, wait_s: float = WAIT_S, engine: Any = None) -> Lease:
    """Hold the conversation, waiting up to `wait_s` seconds. Raises BusyError. With the
    `engine` of a PostgreSQL store the hold is on the server, for every host (see above);
    otherwise a file lock in the data dir."""
    if engine is not None and engine.dialect.name == "postgresql":
        return _acquire_server(conversation_id, wait_s, engine)
    fd = os.open(_lock_path(conversation_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return Lease(conversation_id, fd)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise _busy(conversation_id) from None
            time.sleep(_POLL_S)
        except BaseException:
            os.close(fd)
            raise
