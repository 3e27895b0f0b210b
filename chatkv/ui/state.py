"""What the chat UI remembers between launches: the theme, the last open conversation, and
text typed but not sent when it quit (given back in the input of the same conversation).

A small JSON file (0600) in the data directory. It is a convenience: a missing or damaged
file means "nothing remembered", never a failed launch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from chatkv.paths import data_dir

STATE_FILE = "ui-state.json"


@dataclass
class UIState:
    theme: str | None = None
    last_conversation: int | None = None
    unsent_text: str | None = None  # typed, or sent while the model loaded, when the app quit
    unsent_conversation: int | None = None  # where it was typed (None: a new conversation)


def state_path() -> Path:
    """Where the UI state lives: <data dir>/ui-state.json."""
    return data_dir() / STATE_FILE


def load_state(path: Path) -> UIState:
    """The remembered state; defaults when the file is missing or not what we wrote."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return UIState()
    if not isinstance(raw, dict):
        return UIState()
    theme = raw.get("theme")
    text = raw.get("unsent_text")

    def an_id(value: object) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return UIState(
        theme=theme if isinstance(theme, str) and theme else None,
        last_conversation=an_id(raw.get("last_conversation")),
        unsent_text=text if isinstance(text, str) and text.strip() else None,
        unsent_conversation=an_id(raw.get("unsent_conversation")),
    )


def save_state(path: Path, state: UIState) -> None:
    """Write the state atomically (temp file, rename), private to the user. Raises OSError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(state), f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
