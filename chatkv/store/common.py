"""What the Store's parts share: records, row conversions and small helpers."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import (
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from chatkv.api import MessageView, TurnStats
from chatkv.errors import NotFoundError
from chatkv.store.models import (
    ROLES,
    Conversation,
    KVChunk,
    Message,
    MessageVersion,
)

TITLE_CHARS = 60

# Keys per IN (...) list: well under SQLite's smallest host-parameter limit (999).
_IN_BATCH = 900

_STAT_FIELDS = tuple(f.name for f in fields(TurnStats))

log = logging.getLogger(__name__)


@dataclass
class ChunkRecord:
    """One row of the chunk index: where a chunk file is and what it holds."""

    key: str  # hex sha256 of (fingerprint, codec, parent, token ids)
    parent: str | None  # the previous chunk's key; None for the first chunk
    fingerprint: str
    codec: str
    start: int  # position of its first token
    n_tokens: int
    partial: bool  # the unfinished tail chunk, replaced when it fills
    path: str  # relative to the kv dir
    nbytes: int
    checksum: str
    created_at: datetime | None = None  # filled in by add_chunk when None
    last_used_at: datetime | None = None  # filled in by add_chunk when None


@dataclass
class KVHead:
    """A conversation's pointer into the chunk index."""

    key: str | None
    tokens: int
    fingerprint: str | None


def _conversation_missing(conversation_id: int) -> NotFoundError:
    return NotFoundError(f"conversation {conversation_id} not found; `chatkv ls` lists conversations")


def _message_missing(message_id: int) -> NotFoundError:
    return NotFoundError(f"message {message_id} not found; `chatkv show` lists a conversation's messages")


def _title_from(content: str) -> str:
    """The first non-blank line, cut to TITLE_CHARS."""
    for line in content.splitlines():
        if line.strip():
            return line.strip()[:TITLE_CHARS].rstrip()
    return ""


def _settings_json(settings: dict[str, Any] | None) -> str:
    try:
        return json.dumps(settings or {}, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"settings must be JSON-serializable: {settings!r} ({e})") from e


def _batches(keys: Iterable[str]) -> Iterator[list[str]]:
    keys = list(dict.fromkeys(keys))  # drop duplicates, keep order
    for i in range(0, len(keys), _IN_BATCH):
        yield keys[i : i + _IN_BATCH]


_index_warned = False


def _warn_index_damaged(e: Exception) -> None:
    global _index_warned
    if not _index_warned:
        _index_warned = True
        log.warning(
            "the KV chunk index is damaged (%s); conversations are unaffected; "
            "run `chatkv cache rebuild` to rebuild it from the chunk files",
            getattr(e, "orig", e),
        )


def new_turn_id() -> str:
    """A fresh id for one turn (the reply it saves carries it)."""
    return uuid.uuid4().hex


def _message_view(m: Message) -> MessageView:
    values = {f: getattr(m, f) for f in _STAT_FIELDS}
    has_stats = any(v is not None for v in values.values())
    stats = TurnStats(**{f: v for f, v in values.items() if v is not None}) if has_stats else None
    return MessageView(
        id=m.id,
        conversation_id=m.conversation_id,
        position=m.position,
        role=m.role,  # type: ignore[arg-type]  # the CHECK constraint keeps it one of ROLES
        content=m.content,
        created_at=m.created_at,
        stats=stats,
    )


def _set_stats(m: Message, stats: TurnStats) -> None:
    for f in _STAT_FIELDS:
        setattr(m, f, getattr(stats, f))


def _new_message(
    conversation_id: int,
    position: int,
    role: str,
    content: str,
    now: datetime,
    stats: TurnStats | None = None,
    turn_id: str | None = None,
) -> Message:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    msg = Message(
        conversation_id=conversation_id,
        position=position,
        role=role,
        content=content,
        created_at=now,
        turn_id=turn_id,
    )
    if stats is not None:
        _set_stats(msg, stats)
    return msg


def _version_of(m: Message, group_id: str, now: datetime) -> MessageVersion:
    values = {f: getattr(m, f) for f in _STAT_FIELDS}
    has_stats = any(v is not None for v in values.values())
    return MessageVersion(
        conversation_id=m.conversation_id,
        position=m.position,
        role=m.role,
        content=m.content,
        stats=json.dumps({k: v for k, v in values.items() if v is not None}) if has_stats else None,
        turn_id=m.turn_id,
        group_id=group_id,
        created_at=m.created_at,
        archived_at=now,
    )


def _version_view(v: MessageVersion) -> MessageView:
    return MessageView(
        id=v.id,
        conversation_id=v.conversation_id,
        position=v.position,
        role=v.role,  # type: ignore[arg-type]
        content=v.content,
        created_at=v.created_at,
        stats=TurnStats(**json.loads(v.stats)) if v.stats else None,
    )


def _chunk_record(c: KVChunk) -> ChunkRecord:
    return ChunkRecord(**{f.name: getattr(c, f.name) for f in fields(ChunkRecord)})


class StoreBase:
    """What the Store's parts share: a reader and a writer session factory (see Store)."""

    _reader: sessionmaker[Session]
    _writer: sessionmaker[Session]

    def _dialect(self) -> str:
        """The database's SQL dialect: "sqlite" or "postgresql"."""
        return self._reader.kw["bind"].dialect.name

    def _insert(self, table: Any) -> Any:
        """INSERT with ON CONFLICT for this database: SQLite's and PostgreSQL's constructs
        take the same on_conflict_do_nothing / on_conflict_do_update arguments."""
        if self._dialect() == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    @staticmethod
    def _get_conversation(s: Session, conversation_id: int) -> Conversation:
        conv = s.get(Conversation, conversation_id)
        if conv is None:
            raise _conversation_missing(conversation_id)
        return conv

    def _update_conversation(self, conversation_id: int, **values: Any) -> None:
        with self._writer.begin() as s:
            stmt = update(Conversation).where(Conversation.id == conversation_id).values(**values)
            if s.execute(stmt).rowcount == 0:
                raise _conversation_missing(conversation_id)
