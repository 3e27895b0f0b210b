"""The reply journal: what a turn has streamed is on disk before the database has it.

A reply is shown to the user token by token but saved in one database transaction at
the end. If that save fails (the database locked by another program, a full disk) or
the process dies first, the text the user already read would be gone. So every turn
appends what it streams to a small private journal file (one `write` per piece: the
text survives the process being killed, without an fsync per token), saves the reply,
and deletes the journal. A journal left behind is replayed the next time chatkv opens
the store: the reply is saved under its turn id, which the database keeps unique, so a
replay never saves anything twice.

File: `<data dir>/journal/<conversation>-<turn id>.jsonl`, mode 0600, JSON lines: a
header (conversation, turn id, what the turn replaces, the model), `{"stats": …}` once the prompt
is known, `{"p": piece}` per piece, `{"end": reason, "stats": …}` before the save. The
writer holds an exclusive flock on it, so a replay never takes a journal that a live
turn (in this or another process) is still writing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc

from chatkv.api import MessageView, TurnStats
from chatkv.errors import NotFoundError
from chatkv.paths import data_dir, ensure_private_dir

if TYPE_CHECKING:
    from chatkv.store import Store

log = logging.getLogger(__name__)


def journal_dir() -> Path:
    return ensure_private_dir(data_dir() / "journal")


@dataclass
class Header:
    """What a turn will change when its reply is saved (see Store.finish_turn)."""

    conversation_id: int
    turn_id: str
    set_aside: list[int]
    edit: tuple[int, str] | None
    reply_position: int | None = None  # where the reply goes (an edited message just before it)
    model: str = ""  # the model that writes the reply: it becomes the conversation's model

    @property
    def replaces(self) -> bool:
        """A regenerate or an edit: it changes the transcript only when it finishes."""
        return bool(self.set_aside or self.edit)


class Journal:
    """The journal of one turn, open for appending while the turn runs."""

    def __init__(self, header: Header):
        self.header = header
        self.path = journal_dir() / f"{header.conversation_id}-{header.turn_id}.jsonl"
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        h = header
        self._line({"v": 1, "conversation_id": h.conversation_id, "turn_id": h.turn_id,
                    "set_aside": h.set_aside, "edit": list(h.edit) if h.edit else None,
                    "reply_position": h.reply_position, "model": h.model})  # fmt: skip

    def _line(self, obj: dict[str, Any]) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass"))
        except OSError as e:  # a full disk must not stop the turn; the database save may still work
            log.warning("could not write the reply journal %s: %s", self.path, e)

    def stats(self, stats: TurnStats) -> None:
        self._line({"stats": stats.to_dict()})

    def piece(self, text: str, tokens: int) -> None:
        """A piece of the reply, and how many tokens the reply has with it."""
        self._line({"p": text, "n": tokens})

    def end(self, reason: str, stats: TurnStats) -> None:
        self._line({"end": reason, "stats": stats.to_dict()})

    def close(self, saved: bool) -> None:
        """Close the file; delete it when the reply is safely in the database."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if saved:
            self.path.unlink(missing_ok=True)
        os.close(fd)  # drops the lock: an unsaved journal is now free for replay


@dataclass
class Replayed:
    header: Header
    text: str
    stats: TurnStats
    ended: str | None  # the finish reason when the turn got as far as its save


def _pair(value: Any) -> tuple[int, str] | None:
    return (int(value[0]), str(value[1])) if value else None


def _header(obj: dict[str, Any]) -> Header:
    return Header(
        conversation_id=int(obj["conversation_id"]),
        turn_id=str(obj["turn_id"]),
        set_aside=[int(i) for i in obj.get("set_aside") or []],
        edit=_pair(obj.get("edit")),
        reply_position=None if obj.get("reply_position") is None else int(obj["reply_position"]),
        model=str(obj.get("model") or ""),  # absent in journals of chatkv before it was kept
    )


def read(path: Path) -> Replayed | None:
    """Parse a journal; None when it has no usable header."""
    try:
        raw = path.read_bytes().decode("utf-8", "surrogatepass")
    except (OSError, UnicodeDecodeError):
        return None
    header: Header | None = None
    pieces: list[str] = []
    stats, ended, tokens = TurnStats(), None, 0
    for line in raw.split("\n"):
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if not isinstance(obj, dict):
            continue
        try:
            if header is None:
                header = _header(obj)
            elif "p" in obj:
                pieces.append(str(obj["p"]))
                tokens = int(obj.get("n") or tokens)
            elif "stats" in obj:
                known = TurnStats.__dataclass_fields__
                stats = TurnStats(**{k: v for k, v in obj["stats"].items() if k in known})
                ended = obj.get("end", ended)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            if header is None:
                return None  # not a journal this chatkv wrote
    if header is None:
        return None
    if ended is None:  # the process died while it streamed: the tokens its pieces count
        stats.completion_tokens = max(stats.completion_tokens or 0, tokens)
    return Replayed(header, "".join(pieces), stats, ended)


def apply(store: Store, h: Header, text: str, stats: TurnStats, reason: str | None) -> MessageView | None:
    """Save a turn's reply as the turn says: a send, or a regenerate or edit that finished,
    saves it as the reply (with what it replaces, in one transaction); a regenerate or edit
    that did not (`reason` cancelled, error, or None: the process died) changes nothing, and
    what it streamed is kept as an earlier version (None is returned). The live turn and a
    replayed journal both save through here."""
    if h.replaces and reason in (None, "cancelled", "error"):
        rows: list[tuple[int, str, str, TurnStats | None]] = []
        if h.edit is not None and h.reply_position is not None:
            rows.append((h.reply_position - 1, "user", h.edit[1], None))
        rows.append((h.reply_position or 0, "assistant", text, stats))
        store.keep_version(h.conversation_id, h.turn_id, rows)
        return None
    return store.finish_turn(h.conversation_id, text, stats, h.turn_id, h.set_aside, h.edit, model=h.model)


def save(store: Store, r: Replayed) -> None:
    """Put a journaled reply where its turn would have (see `apply`)."""
    if r.ended is None:
        r.stats.finish_reason = "cancelled"  # the process died while it streamed
    apply(store, r.header, r.text, r.stats, r.ended)


PENDING = (
    "conversation {} has a reply from an earlier run that could not be saved yet (the database is "
    "busy); try again in a moment"
)


def pending(conversation_id: int) -> bool:
    """Whether a journal of the conversation is still unsaved (its save failed again, or
    another process is saving it right now)."""
    try:
        return any(journal_dir().glob(f"{int(conversation_id)}-*.jsonl"))
    except OSError:
        return False


def replay(store: Store, conversation_id: int | None = None) -> int:
    """Save the replies of journals that no live turn holds (all, or one conversation's);
    returns how many were saved. A journal whose save fails again stays for the next try."""
    pattern = "*.jsonl" if conversation_id is None else f"{int(conversation_id)}-*.jsonl"
    try:
        paths = sorted(journal_dir().glob(pattern))
    except OSError:
        return 0
    saved = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a turn is still writing it
            r = read(path)
            if r is not None and r.text:
                try:
                    save(store, r)
                    saved += 1
                    log.warning(
                        "saved a reply to conversation %d that an earlier chatkv run could not save",
                        r.header.conversation_id,
                    )
                except NotFoundError:
                    pass  # the conversation was deleted since
                except exc.SQLAlchemyError as e:
                    log.warning("could not save the journaled reply %s yet: %s", path, getattr(e, "orig", e))
                    continue
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return saved


def discard(conversation_id: int) -> None:
    """Delete the journals of a conversation (it is being removed)."""
    for path in journal_dir().glob(f"{int(conversation_id)}-*.jsonl"):
        path.unlink(missing_ok=True)
