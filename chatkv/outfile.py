"""Files the user names for chatkv to write (`export -o`, `batch -o`): private, and never
through a symbolic link.

A conversation is private text. The file is created with mode 0600 whatever the umask,
and a link at the path is refused rather than followed: following it would let whoever
placed the link choose which file chatkv overwrites.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import TextIO

from chatkv.errors import InputError

_FLAGS = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def open_private(path: str | Path, append: bool = False) -> TextIO:
    """Open `path` for writing UTF-8 text: created 0600 (O_EXCL), or an existing regular file
    of this user truncated (or appended to, with `append`) and made 0600.

    Raises InputError, one line naming the path and what to do, for a directory, a
    symbolic link, a missing directory, another user's file or anything not a regular file.
    """
    path = Path(path)
    flags = _FLAGS | (os.O_APPEND if append else 0)
    try:
        try:
            fd = os.open(path, flags | os.O_EXCL, 0o600)
        except FileExistsError:
            fd = os.open(path, flags, 0o600)  # O_NOFOLLOW: a link fails with ELOOP here
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise InputError(f"{path} is not a regular file; give a file name to write")
                if st.st_uid != os.getuid():
                    raise InputError(f"{path} belongs to another user; choose another file name")
                os.fchmod(fd, 0o600)
                if not append:
                    os.ftruncate(fd, 0)
            except BaseException:
                os.close(fd)
                raise
        # O_NONBLOCK only kept open() from waiting on a FIFO; writes to a file block anyway.
        os.set_blocking(fd, True)
    except OSError as e:
        raise InputError(_why(path, e)) from None
    return os.fdopen(fd, "a" if append else "w", encoding="utf-8")


def _why(path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return f"{path} is a symbolic link; chatkv does not write through links, give the real path"
    if e.errno == errno.EISDIR:
        return f"{path} is a directory; give a file name"
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"directory {path.parent} does not exist; create it or write elsewhere"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied; choose another file name"
    if e.errno == errno.ENXIO:
        return f"{path} is a pipe with no reader; give a file name"
    return f"cannot write {path}: {e.strerror or e}"
