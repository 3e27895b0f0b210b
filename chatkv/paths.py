"""Where chatkv keeps its files. Everything it creates is private to the user."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "chatkv"


def data_dir() -> Path:
    """The data directory: $CHATKV_HOME, else the platform's user data dir."""
    home = os.environ.get("CHATKV_HOME")
    path = Path(home).expanduser() if home else Path(platformdirs.user_data_dir(APP))
    return ensure_private_dir(path)


def config_file() -> Path:
    """The user's config file (may not exist)."""
    home = os.environ.get("CHATKV_HOME")
    if home:
        return Path(home).expanduser() / "config.toml"
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def db_path() -> Path:
    return data_dir() / "chatkv.db"


def kv_dir() -> Path:
    return ensure_private_dir(data_dir() / "kv")


def models_dir() -> Path:
    return ensure_private_dir(data_dir() / "models")


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) with mode 0700 if missing; return it."""
    if not path.is_dir():
        old = os.umask(0o077)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        finally:
            os.umask(old)
    return path


def package_file(name: str) -> Path:
    """A data file shipped with chatkv: inside the wheel, or at the source tree's top."""
    here = Path(__file__).resolve().parent
    bundled = here / "_data" / name
    return bundled if bundled.exists() else here.parent / name
