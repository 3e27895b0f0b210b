"""Ctrl+O: write a conversation as Markdown into the export directory.

The directory is `[ui] export_dir` of the config, or `<data dir>/exports` when that is
empty; it is created private (0700) and each export is a new private file (0600).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from chatkv.config import Settings
from chatkv.paths import data_dir, ensure_private_dir


def export_dir(settings: Settings) -> Path:
    """The export directory (created 0700 if missing). Raises OSError."""
    configured = settings.ui.export_dir.strip()
    path = Path(configured).expanduser() if configured else data_dir() / "exports"
    return ensure_private_dir(path)


def slug(title: str) -> str:
    """A file-name stem from a title: lowercase words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60]


def write_private(path: Path, text: str) -> None:
    """Create `path` (never overwriting) readable by the user only. Raises OSError;
    a half-written file is removed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_export(directory: Path, title: str, conversation_id: int, text: str) -> Path:
    """Write `text` to a new file named after the title ('-2', '-3'… when taken); return it."""
    stem = slug(title) or f"conversation-{conversation_id}"
    n = 1
    while True:
        path = directory / (f"{stem}.md" if n == 1 else f"{stem}-{n}.md")
        try:
            write_private(path, text)
            return path
        except FileExistsError:
            n += 1
