"""Where chatkv keeps its files. Everything it creates is private to the user."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import platformdirs

APP = "chatkv"

log = logging.getLogger(__name__)
_warned: set[Path] = set()


def data_dir() -> Path:
    """The data directory: $CHATKV_HOME, else the platform's user data dir."""
    home = os.environ.get("CHATKV_HOME")
    # absolute: a relative one would move with the working directory
    path = Path(home).expanduser().absolute() if home else Path(platformdirs.user_data_dir(APP))
    # A CHATKV_HOME the user made may be shared on purpose (their home, a project dir):
    # say so rather than change it. The platform's data dir is chatkv's own: tighten it.
    return ensure_private_dir(path, tighten=not home)


def config_file() -> Path:
    """The user's config file (may not exist)."""
    home = os.environ.get("CHATKV_HOME")
    if home:
        return Path(home).expanduser().absolute() / "config.toml"
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def db_path() -> Path:
    return data_dir() / "chatkv.db"


def kv_dir() -> Path:
    return ensure_private_dir(data_dir() / "kv", tighten=True)


def models_dir() -> Path:
    return ensure_private_dir(data_dir() / "models", tighten=True)


def ensure_private_dir(path: Path, tighten: bool = False) -> Path:
    """Create `path` (and parents) with mode 0700 if missing; return it.

    An existing directory that others can read or enter is made 0700 when `tighten` (and
    it is ours), else a warning says so once: chunk files hold the conversations' content.
    """
    if not path.is_dir():
        old = os.umask(0o077)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        finally:
            os.umask(old)
        return path
    st = path.stat()
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        if tighten and st.st_uid == getattr(os, "getuid", lambda: -1)():
            try:
                path.chmod(0o700)
                return path
            except OSError:
                pass
        if path not in _warned:
            _warned.add(path)
            log.warning(
                "%s is readable by other users (mode %s); chatkv keeps conversations there: chmod 700 it",
                path,
                oct(mode),
            )
    return path


def package_file(name: str) -> Path:
    """A data file shipped with chatkv: inside the wheel, or at the source tree's top."""
    here = Path(__file__).resolve().parent
    bundled = here / "_data" / name
    return bundled if bundled.exists() else here.parent / name
