"""One turn at a time per conversation, across processes.

Two chatkv processes continuing one conversation at once would interleave it: each
prompt would include the other's question and no reply would follow its own. A turn
therefore holds an exclusive lock on the conversation for as long as it runs: an
advisory `flock` on a small file under the data dir, which the kernel releases when the
holder exits, however it exits (SIGKILL included), so a crash never leaves it stuck.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from chatkv.errors import ChatKVError
from chatkv.paths import data_dir, ensure_private_dir

WAIT_S = 3.0  # how long a second turn waits for the first before saying "busy"
_POLL_S = 0.05


class BusyError(ChatKVError):
    """Another process (or another turn of this one) is generating in the conversation."""


def _lock_path(conversation_id: int) -> Path:
    return ensure_private_dir(data_dir() / "locks") / f"conversation-{int(conversation_id)}.lock"


class Lease:
    """An exclusive hold on one conversation; `release()` (or garbage collection) ends it."""

    def __init__(self, conversation_id: int, fd: int):
        self.conversation_id = conversation_id
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, forget: bool = False) -> None:
        """End the hold; `forget` also removes the lock file (the conversation is gone)."""
        fd, self._fd = self._fd, None
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


def acquire(conversation_id: int, wait_s: float = WAIT_S) -> Lease:
    """Hold the conversation, waiting up to `wait_s` seconds. Raises BusyError."""
    fd = os.open(_lock_path(conversation_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return Lease(conversation_id, fd)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise BusyError(
                    f"conversation {conversation_id} is busy: another chatkv process is generating a "
                    "reply in it; wait for that reply to finish and retry"
                ) from None
            time.sleep(_POLL_S)
        except BaseException:
            os.close(fd)
            raise
