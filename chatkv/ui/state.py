"""What the chat UI remembers between launches: the theme, the last open conversation, and
text typed but not sent when it quit (given back in the input of the same conversation).

A small JSON file (0600) in the data directory. It is a convenience: a missing or damaged
file means "nothing remembered", never a failed launch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatkv.paths import data_dir

STATE_FILE = "ui-state.json"


@dataclass
class UIState:
    theme: str | None = None
    last_conversation: int | None = None
    # text typed (or sent while the model loaded) but not sent when the app quit, by where it
    # was written (`unsent_key`): each kept until its own conversation is opened again
    unsent: dict[str, str] = field(default_factory=dict)


def unsent_key(conversation_id: int | None) -> str:
    """Where unsent text was written: a conversation's id, or "draft" for a new one."""
    return "draft" if conversation_id is None else str(conversation_id)


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
    unsent = raw.get("unsent")

    def an_id(value: object) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return UIState(
        theme=theme if isinstance(theme, str) and theme else None,
        last_conversation=an_id(raw.get("last_conversation")),
        unsent={k: v for k, v in unsent.items() if isinstance(k, str) and isinstance(v, str) and v.strip()}
        if isinstance(unsent, dict)
        else {},
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
