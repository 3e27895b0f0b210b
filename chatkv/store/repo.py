"""The Store: conversations, messages and the KV chunk index, behind one object.

Every method opens its own Session and returns plain dataclasses (chatkv.api's,
or ChunkRecord), so results outlive the session and a Store can be shared by
threads. Writes run in IMMEDIATE transactions (see chatkv.store.db), so two
processes writing at once wait for each other instead of failing.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    bindparam,
    delete,
    exc,
    func,
    literal_column,
    select,
    table,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased, sessionmaker

from chatkv.api import ConversationSummary, MessageView, TurnStats
from chatkv.errors import NotFoundError
from chatkv.store.db import open_database, writer
from chatkv.store.models import (
    ROLES,
    Conversation,
    ConversationChunk,
    KVChunk,
    Message,
    MessageVersion,
    utcnow,
)
from chatkv.store.search import FTS_TABLES, SNIPPET_TOKENS, SearchHit, fts_phrase, substring_snippet

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


class Store:
    """chatkv's database. Opening it creates the file (mode 0600) and upgrades the schema.

    Args:
        path: the SQLite file, usually chatkv.paths.db_path().

    Raises:
        ChatKVError: the file is not a SQLite database, or was written by a newer chatkv.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._engine = open_database(self.path)
        # A Session per call. Reads begin DEFERRED (a consistent snapshot); writes go
        # through _writer.begin(), IMMEDIATE, so they queue for the write lock.
        self._reader = sessionmaker(self._engine, expire_on_commit=False)
        self._writer = sessionmaker(writer(self._engine), expire_on_commit=False)

    def close(self) -> None:
        """Close pooled connections. Safe to call twice."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- conversations ---------------------------------------------------------

    @staticmethod
    def _get_conversation(s: Session, conversation_id: int) -> Conversation:
        conv = s.get(Conversation, conversation_id)
        if conv is None:
            raise _conversation_missing(conversation_id)
        return conv

    @staticmethod
    def _summaries(s: Session, convs: Sequence[Conversation]) -> list[ConversationSummary]:
        """Summaries of `convs` with counts and cache sizes, in two queries whatever their number."""
        if not convs:
            return []
        ids = [c.id for c in convs]
        count_stmt = (
            select(Message.conversation_id, func.count())
            .where(Message.conversation_id.in_(ids))
            .group_by(Message.conversation_id)
        )
        counts: dict[int, int] = dict(s.execute(count_stmt).all())
        # Each conversation's chain from kv_head to the root. UNION (not UNION ALL)
        # stops on a repeated row, so even a corrupt, cyclic index terminates.
        chain = (
            select(Conversation.id.label("conversation_id"), KVChunk.key, KVChunk.parent, KVChunk.nbytes)
            .select_from(Conversation)
            .join(KVChunk, KVChunk.key == Conversation.kv_head)
            .where(Conversation.id.in_(ids))
            .cte("chain", recursive=True)
        )
        up = aliased(KVChunk)
        chain = chain.union(
            select(chain.c.conversation_id, up.key, up.parent, up.nbytes)
            .select_from(chain)
            .join(up, up.key == chain.c.parent)
        )
        # A conversation appears here exactly when its kv_head chunk is indexed.
        bytes_stmt = select(chain.c.conversation_id, func.sum(chain.c.nbytes)).group_by(
            chain.c.conversation_id
        )
        try:
            with s.begin_nested():
                on_disk: dict[int, int] = dict(s.execute(bytes_stmt).all())
        except exc.DatabaseError as e:
            # The chunk index is derived data: damage to it never hides the transcript.
            _warn_index_damaged(e)
            on_disk = {}
        return [
            ConversationSummary(
                id=c.id,
                title=c.title,
                model=c.model,
                system_prompt=c.system_prompt,
                created_at=c.created_at,
                updated_at=c.updated_at,
                message_count=counts.get(c.id, 0),
                token_count=c.kv_tokens,
                cache_state="disk" if c.id in on_disk else "none",
                cache_bytes=int(on_disk.get(c.id, 0)),
            )
            for c in convs
        ]

    def create_conversation(
        self,
        title: str = "",
        model: str = "",
        system_prompt: str = "",
        settings: dict[str, Any] | None = None,
    ) -> ConversationSummary:
        """Create an empty conversation. `settings` (generation settings) must be JSON-serializable."""
        now = utcnow()
        conv = Conversation(
            title=title,
            model=model,
            system_prompt=system_prompt,
            settings=_settings_json(settings),
            created_at=now,
            updated_at=now,
            kv_tokens=0,
        )
        with self._writer.begin() as s:
            s.add(conv)
            s.flush()
            return self._summaries(s, [conv])[0]

    def get_conversation(self, conversation_id: int) -> ConversationSummary:
        """The conversation's summary. Raises NotFoundError."""
        with self._reader() as s:
            return self._summaries(s, [self._get_conversation(s, conversation_id)])[0]

    def latest_conversation(self) -> ConversationSummary | None:
        """The most recently updated conversation, or None when there is none."""
        found = self.list_conversations(limit=1)
        return found[0] if found else None

    def list_conversations(self, query: str = "", limit: int = 200) -> list[ConversationSummary]:
        """Conversations, most recently updated first.

        Args:
            query: if not empty, keep those whose title or any message contains it
                (case-insensitive, Unicode-aware; through the FTS5 index when it can).
            limit: at most this many (>= 1).
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        stmt = select(Conversation).order_by(Conversation.updated_at.desc(), Conversation.id.desc())
        if query:
            stmt = stmt.where(self._query_clause(query))  # full-text index, else a scan
        with self._reader() as s:
            return self._summaries(s, s.scalars(stmt.limit(limit)).all())

    def _update_conversation(self, conversation_id: int, **values: Any) -> None:
        with self._writer.begin() as s:
            stmt = update(Conversation).where(Conversation.id == conversation_id).values(**values)
            if s.execute(stmt).rowcount == 0:
                raise _conversation_missing(conversation_id)

    def rename(self, conversation_id: int, title: str) -> None:
        """Set the title. Raises NotFoundError."""
        self._update_conversation(conversation_id, title=title, updated_at=utcnow())

    def set_model(self, conversation_id: int, name: str) -> None:
        """Record the model the conversation now uses (its model.name). Raises NotFoundError."""
        self._update_conversation(conversation_id, model=name, updated_at=utcnow())

    def set_system_prompt(self, conversation_id: int, text: str) -> None:
        """Replace the system prompt. Raises NotFoundError."""
        self._update_conversation(conversation_id, system_prompt=text, updated_at=utcnow())

    def set_conversation_settings(self, conversation_id: int, settings: dict[str, Any]) -> None:
        """Replace the stored generation settings. Raises NotFoundError."""
        self._update_conversation(conversation_id, settings=_settings_json(settings), updated_at=utcnow())

    def conversation_settings(self, conversation_id: int) -> dict[str, Any]:
        """The generation settings stored with the conversation. Raises NotFoundError."""
        with self._reader() as s:
            return json.loads(self._get_conversation(s, conversation_id).settings or "{}")

    def delete_conversation(self, conversation_id: int) -> None:
        """Delete the conversation and its messages. Its chunks stay (they may be shared);
        `chatkv cache gc` evicts them. Raises NotFoundError."""
        with self._writer.begin() as s:
            result = s.execute(delete(Conversation).where(Conversation.id == conversation_id))
            if result.rowcount == 0:
                raise _conversation_missing(conversation_id)

    def set_kv_head(
        self, conversation_id: int, key: str | None, tokens: int, fingerprint: str | None
    ) -> None:
        """Record the newest chunk spilled for the conversation and the tokens its chain covers.

        Does not touch updated_at: a background spill is not activity. Raises NotFoundError.
        """
        self._update_conversation(conversation_id, kv_head=key, kv_tokens=tokens, kv_fingerprint=fingerprint)

    def get_kv_head(self, conversation_id: int) -> KVHead:
        """The conversation's kv_head, kv_tokens and kv_fingerprint. Raises NotFoundError."""
        with self._reader() as s:
            c = self._get_conversation(s, conversation_id)
            return KVHead(key=c.kv_head, tokens=c.kv_tokens, fingerprint=c.kv_fingerprint)

    def chunk_is_head(self, key: str) -> bool:
        """Whether any conversation's kv_head is this chunk (so it must not be dropped as superseded)."""
        with self._reader() as s:
            return s.scalar(select(Conversation.id).where(Conversation.kv_head == key).limit(1)) is not None

    # -- messages --------------------------------------------------------------

    def add_message(
        self, conversation_id: int, role: str, content: str, stats: TurnStats | None = None
    ) -> MessageView:
        """Append a message at the next position and bump the conversation's updated_at.

        A conversation without a title takes the first line of its first user message.
        Raises NotFoundError, or ValueError for a role other than system/user/assistant.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        now = utcnow()
        with self._writer.begin() as s:
            conv = self._get_conversation(s, conversation_id)
            # Safe without a race: the IMMEDIATE transaction holds the write lock.
            last = s.scalar(
                select(func.max(Message.position)).where(Message.conversation_id == conversation_id)
            )
            msg = Message(
                conversation_id=conversation_id,
                position=0 if last is None else last + 1,
                role=role,
                content=content,
                created_at=now,
            )
            if stats is not None:
                _set_stats(msg, stats)
            s.add(msg)
            conv.updated_at = now
            if not conv.title and role == "user":
                conv.title = _title_from(content)
            s.flush()
            return _message_view(msg)

    def messages(self, conversation_id: int) -> list[MessageView]:
        """The conversation's messages ordered by position. Raises NotFoundError."""
        with self._reader() as s:
            self._get_conversation(s, conversation_id)
            rows = s.scalars(
                select(Message).where(Message.conversation_id == conversation_id).order_by(Message.position)
            )
            return [_message_view(m) for m in rows]

    def get_message(self, message_id: int) -> MessageView:
        """One message. Raises NotFoundError."""
        with self._reader() as s:
            msg = s.get(Message, message_id)
            if msg is None:
                raise _message_missing(message_id)
            return _message_view(msg)

    def update_message(self, message_id: int, content: str, stats: TurnStats | None = None) -> MessageView:
        """Replace a message's content, and its stats when `stats` is given (None keeps them).

        Bumps the conversation's updated_at. Raises NotFoundError.
        """
        with self._writer.begin() as s:
            msg = s.get(Message, message_id)
            if msg is None:
                raise _message_missing(message_id)
            msg.content = content
            if stats is not None:
                _set_stats(msg, stats)
            msg.conversation.updated_at = utcnow()
            s.flush()
            return _message_view(msg)

    def delete_messages_from(self, conversation_id: int, position: int) -> int:
        """Delete the messages at `position` and after; return how many. Raises NotFoundError."""
        with self._writer.begin() as s:
            conv = self._get_conversation(s, conversation_id)
            result = s.execute(
                delete(Message)
                .where(Message.conversation_id == conversation_id)
                .where(Message.position >= position)
            )
            if result.rowcount:
                conv.updated_at = utcnow()
            return result.rowcount

    def start_conversation(
        self,
        text: str,
        *,
        title: str = "",
        model: str = "",
        system_prompt: str = "",
        settings: dict[str, Any] | None = None,
    ) -> tuple[ConversationSummary, MessageView]:
        """Create a conversation together with its first user message, in one transaction
        (so no empty conversation is ever left behind)."""
        now = utcnow()
        conv = Conversation(
            title=title or _title_from(text),
            model=model,
            system_prompt=system_prompt,
            settings=_settings_json(settings),
            created_at=now,
            updated_at=now,
            kv_tokens=0,
        )
        with self._writer.begin() as s:
            s.add(conv)
            s.flush()
            msg = Message(conversation_id=conv.id, position=0, role="user", content=text, created_at=now)
            s.add(msg)
            s.flush()
            return self._summaries(s, [conv])[0], _message_view(msg)

    def delete_message(self, message_id: int) -> bool:
        """Delete one message by id (never by position: another process may have added
        messages after it). Returns whether it was there."""
        with self._writer.begin() as s:
            return s.execute(delete(Message).where(Message.id == message_id)).rowcount > 0

    def finish_turn(
        self,
        conversation_id: int,
        content: str,
        stats: TurnStats,
        turn_id: str,
        set_aside: Sequence[int] = (),
        edit: tuple[int, str] | None = None,
        add: Sequence[tuple[str, str]] = (),
    ) -> MessageView:
        """Save a turn's reply, in one transaction with what the turn changes.

        Args:
            set_aside: ids of messages the reply replaces (a regenerated reply; an edited
                message and what followed it). They move to the earlier versions, grouped
                under `turn_id`, never deleted.
            edit: (id of a set-aside user message, its new text): the new text takes the
                old message's place before the reply.
            add: (role, content) of messages to append before the reply (a batch line's
                question, saved only with its answer).

        Idempotent: a reply already saved under `turn_id` is returned as it is (a journal
        replayed after a crash saves nothing twice). Raises NotFoundError.
        """
        with self._writer.begin() as s:
            return self._finish(s, conversation_id, content, stats, turn_id, set_aside, edit, add)

    def _finish(
        self,
        s: Session,
        conversation_id: int,
        content: str,
        stats: TurnStats,
        turn_id: str,
        set_aside: Sequence[int],
        edit: tuple[int, str] | None,
        add: Sequence[tuple[str, str]],
    ) -> MessageView:
        now = utcnow()
        done = s.scalar(select(Message).where(Message.turn_id == turn_id))
        if done is not None:
            return _message_view(done)
        conv = self._get_conversation(s, conversation_id)
        edited_position = None
        if set_aside:
            rows = s.scalars(
                select(Message)
                .where(Message.id.in_(list(set_aside)), Message.conversation_id == conversation_id)
                .order_by(Message.position)
            ).all()
            for m in rows:
                if edit is not None and m.id == edit[0]:
                    edited_position = m.position
                s.add(_version_of(m, turn_id, now))
                s.delete(m)
            s.flush()
        last = s.scalar(select(func.max(Message.position)).where(Message.conversation_id == conversation_id))
        position = 0 if last is None else last + 1
        if edit is not None:
            if edited_position is None:
                raise _message_missing(edit[0])
            s.add(
                Message(
                    conversation_id=conversation_id,
                    position=position,
                    role="user",
                    content=edit[1],
                    created_at=now,
                )
            )
            position += 1
        for role, body in add:
            s.add(_new_message(conversation_id, position, role, body, now))
            position += 1
        msg = _new_message(conversation_id, position, "assistant", content, now, stats, turn_id)
        s.add(msg)
        conv.updated_at = now
        if not conv.title:
            conv.title = next((_title_from(t) for r, t in add if r == "user"), "")
        s.flush()
        return _message_view(msg)

    def save_new_conversation(
        self,
        messages: Sequence[tuple[str, str]],
        reply: str,
        stats: TurnStats,
        turn_id: str,
        *,
        model: str = "",
        system_prompt: str = "",
        settings: dict[str, Any] | None = None,
    ) -> tuple[ConversationSummary, MessageView]:
        """Create a conversation holding `messages` ((role, content) each) and the reply to
        them, in one transaction (a batch line saved as a conversation)."""
        now = utcnow()
        conv = Conversation(
            title="",
            model=model,
            system_prompt=system_prompt,
            settings=_settings_json(settings),
            created_at=now,
            updated_at=now,
            kv_tokens=0,
        )
        with self._writer.begin() as s:
            s.add(conv)
            s.flush()
            msg = self._finish(s, conv.id, reply, stats, turn_id, (), None, messages)
            return self._summaries(s, [conv])[0], msg

    def keep_version(
        self,
        conversation_id: int,
        turn_id: str,
        rows: Sequence[tuple[int, str, str, TurnStats | None]],
    ) -> None:
        """Keep messages that never became current (the partial reply of a stopped
        regenerate or edit, with the edited text) as earlier versions: (position, role,
        content, stats) each, grouped under `turn_id`. Idempotent per turn."""
        now = utcnow()
        with self._writer.begin() as s:
            self._get_conversation(s, conversation_id)
            if s.scalar(select(MessageVersion.id).where(MessageVersion.group_id == turn_id).limit(1)):
                return
            for position, role, content, stats in rows:
                s.add(
                    MessageVersion(
                        conversation_id=conversation_id,
                        position=position,
                        role=role,
                        content=content,
                        stats=json.dumps(stats.to_dict()) if stats else None,
                        turn_id=turn_id if role == "assistant" else None,
                        group_id=turn_id,
                        created_at=now,
                        archived_at=now,
                    )
                )

    def versions(self, message_id: int) -> list[MessageView]:
        """The earlier versions of a message (same conversation, position and role), oldest
        first. Their ids are version ids, for `restore`. Raises NotFoundError."""
        with self._reader() as s:
            msg = s.get(Message, message_id)
            if msg is None:
                raise _message_missing(message_id)
            rows = s.scalars(
                select(MessageVersion)
                .where(
                    MessageVersion.conversation_id == msg.conversation_id,
                    MessageVersion.position == msg.position,
                    MessageVersion.role == msg.role,
                )
                .order_by(MessageVersion.created_at, MessageVersion.id)
            )
            return [_version_view(v) for v in rows]

    def restore(self, message_id: int, version_id: int) -> None:
        """Make an earlier version current again, with the messages set aside together with
        it; the current message and everything after it become earlier versions in turn.
        Raises NotFoundError."""
        now = utcnow()
        with self._writer.begin() as s:
            msg = s.get(Message, message_id)
            if msg is None:
                raise _message_missing(message_id)
            v = s.get(MessageVersion, version_id)
            if v is None or v.conversation_id != msg.conversation_id or v.position != msg.position:
                raise NotFoundError(
                    f"version {version_id} is not an earlier version of message {message_id}; "
                    "`chatkv show` lists a conversation's messages"
                )
            group = s.scalars(
                select(MessageVersion)
                .where(MessageVersion.group_id == v.group_id, MessageVersion.position >= v.position)
                .order_by(MessageVersion.position, MessageVersion.id)
            ).all()
            current = s.scalars(
                select(Message)
                .where(Message.conversation_id == msg.conversation_id, Message.position >= msg.position)
                .order_by(Message.position)
            ).all()
            aside = new_turn_id()
            for m in current:
                s.add(_version_of(m, aside, now))
                s.delete(m)
            s.flush()
            for i, old in enumerate(group):
                m = Message(
                    conversation_id=old.conversation_id,
                    position=msg.position + i,
                    role=old.role,
                    content=old.content,
                    created_at=old.created_at,
                    turn_id=old.turn_id,
                )
                if old.stats:
                    _set_stats(m, TurnStats(**json.loads(old.stats)))
                s.add(m)
                s.delete(old)
            s.get(Conversation, msg.conversation_id).updated_at = now

    # -- which chunks each conversation made -------------------------------------

    def add_conversation_chunks(self, conversation_id: int, keys: Sequence[str]) -> None:
        """Record that these chunks hold (a prefix of) the conversation's tokens."""
        if not keys:
            return
        with self._writer.begin() as s:
            if s.get(Conversation, conversation_id) is None:
                return  # deleted while its spill was queued
            for batch in _batches(keys):
                stmt = sqlite_insert(ConversationChunk).values(
                    [{"conversation_id": conversation_id, "key": k} for k in batch]
                )
                s.execute(stmt.on_conflict_do_nothing())

    def private_chunks(self, conversation_id: int) -> list[str]:
        """Keys of the chunks made for this conversation that no other conversation uses."""
        other = aliased(ConversationChunk)
        shared = (
            select(other.key)
            .where(other.key == ConversationChunk.key, other.conversation_id != conversation_id)
            .exists()
        )
        with self._reader() as s:
            return list(
                s.scalars(
                    select(ConversationChunk.key).where(
                        ConversationChunk.conversation_id == conversation_id, ~shared
                    )
                )
            )

    def unreferenced_chunks(self, keys: Sequence[str]) -> list[str]:
        """Those of `keys` that no conversation records as its own."""
        used: set[str] = set()
        with self._reader() as s:
            for batch in _batches(keys):
                used.update(s.scalars(select(ConversationChunk.key).where(ConversationChunk.key.in_(batch))))
        return [k for k in dict.fromkeys(keys) if k not in used]

    # -- chunk index -----------------------------------------------------------

    def add_chunk(self, rec: ChunkRecord) -> None:
        """Index a chunk file. A key already indexed (the same content written again, or
        re-coded as it aged) keeps its row and takes the new codec, path, nbytes, checksum
        and last_used_at."""
        now = utcnow()
        values = asdict(rec)
        values["created_at"] = rec.created_at or now
        values["last_used_at"] = rec.last_used_at or now
        stmt = sqlite_insert(KVChunk).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[KVChunk.key],
            set_={c: stmt.excluded[c] for c in ("codec", "path", "nbytes", "checksum", "last_used_at")},
        )
        with self._writer.begin() as s:
            s.execute(stmt)

    def get_chunks(self, keys: Sequence[str]) -> dict[str, ChunkRecord]:
        """The indexed chunks among `keys`, by key (missing keys are absent)."""
        found: dict[str, ChunkRecord] = {}
        with self._reader() as s:
            for batch in _batches(keys):
                for c in s.scalars(select(KVChunk).where(KVChunk.key.in_(batch))):
                    found[c.key] = _chunk_record(c)
        return found

    def find_partials(
        self, parent: str | None, fingerprint: str, codec: str, start: int
    ) -> list[ChunkRecord]:
        """Partial chunks that continue `parent` (None: chunks at the start), newest first."""
        parent_is = KVChunk.parent.is_(None) if parent is None else KVChunk.parent == parent
        stmt = (
            select(KVChunk)
            .where(parent_is, KVChunk.partial.is_(True))
            .where(KVChunk.fingerprint == fingerprint, KVChunk.codec == codec, KVChunk.start == start)
            .order_by(KVChunk.created_at.desc(), KVChunk.key)
        )
        with self._reader() as s:
            return [_chunk_record(c) for c in s.scalars(stmt)]

    def touch_chunks(self, keys: Sequence[str]) -> None:
        """Mark chunks as just used (eviction goes by last use)."""
        now = utcnow()
        with self._writer.begin() as s:
            for batch in _batches(keys):
                s.execute(update(KVChunk).where(KVChunk.key.in_(batch)).values(last_used_at=now))

    def delete_chunks(self, keys: Sequence[str]) -> int:
        """Remove chunks from the index (not their files); return how many rows went."""
        deleted = 0
        with self._writer.begin() as s:
            for batch in _batches(keys):
                deleted += s.execute(delete(KVChunk).where(KVChunk.key.in_(batch))).rowcount
        return deleted

    def delete_chunks_if(self, recs: Sequence[ChunkRecord]) -> set[str]:
        """Remove chunks' rows only where a row still has the record's checksum and size
        (compare and delete): a row a concurrent spill has just rewritten stays.
        Returns the keys whose rows went."""
        gone: set[str] = set()
        with self._writer.begin() as s:
            for rec in recs:
                stmt = (
                    delete(KVChunk)
                    .where(KVChunk.key == rec.key)
                    .where(KVChunk.checksum == rec.checksum, KVChunk.nbytes == rec.nbytes)
                )
                if s.execute(stmt).rowcount:
                    gone.add(rec.key)
        return gone

    def replace_chunk_index(self, recs: Sequence[ChunkRecord]) -> None:
        """Drop the chunk index (whatever state its table is in), recreate it from the ORM
        model and fill it with `recs`, in one transaction (`chatkv cache rebuild`)."""
        with self._writer.begin() as s:
            conn = s.connection()
            conn.exec_driver_sql("DROP TABLE IF EXISTS kv_chunks")
            KVChunk.__table__.create(conn)
            now = utcnow()
            rows = [
                asdict(r) | {"created_at": r.created_at or now, "last_used_at": r.last_used_at or now}
                for r in recs
            ]
            for i in range(0, len(rows), _IN_BATCH // 16):  # 12 columns a row: under 999 parameters
                s.execute(
                    sqlite_insert(KVChunk).values(rows[i : i + _IN_BATCH // 16]).on_conflict_do_nothing()
                )

    def chunk_chain(self, head_key: str) -> list[ChunkRecord]:
        """The chunk `head_key` and its ancestors, root first.

        Stops at the first ancestor missing from the index, so the result starts at
        position 0 (chain[0].parent is None) only when the whole chain is indexed.
        Empty when `head_key` itself is not indexed.
        """
        chain = (
            select(KVChunk.key, KVChunk.parent).where(KVChunk.key == head_key).cte("chain", recursive=True)
        )
        up = aliased(KVChunk)
        chain = chain.union(select(up.key, up.parent).select_from(chain).join(up, up.key == chain.c.parent))
        with self._reader() as s:
            rows = {c.key: c for c in s.scalars(select(KVChunk).where(KVChunk.key.in_(select(chain.c.key))))}
        out: list[ChunkRecord] = []
        key: str | None = head_key
        while key is not None and key in rows:
            out.append(_chunk_record(rows.pop(key)))  # pop: a cycle cannot loop forever
            key = out[-1].parent
        out.reverse()
        return out

    def chunk_stats(self) -> dict[str, Any]:
        """Totals of the index: {"count", "bytes", "partial", "by_codec": {codec: {"count", "bytes"}},
        "by_fingerprint": {fingerprint: {"count", "bytes"}}}."""
        stmt = select(
            KVChunk.codec,
            KVChunk.fingerprint,
            func.count(),
            func.coalesce(func.sum(KVChunk.nbytes), 0),
            func.coalesce(func.sum(KVChunk.partial), 0),
        ).group_by(KVChunk.codec, KVChunk.fingerprint)
        stats: dict[str, Any] = {"count": 0, "bytes": 0, "partial": 0, "by_codec": {}, "by_fingerprint": {}}
        with self._reader() as s:
            rows = s.execute(stmt).all()
        for codec, fingerprint, count, nbytes, partial in rows:
            stats["count"] += count
            stats["bytes"] += nbytes
            stats["partial"] += partial
            # the codec column holds "name:params-digest" (kv/codecs.py Codec.tag); totals go by name
            for group, name in (("by_codec", codec.split(":")[0]), ("by_fingerprint", fingerprint)):
                entry = stats[group].setdefault(name, {"count": 0, "bytes": 0})
                entry["count"] += count
                entry["bytes"] += nbytes
        return stats

    def chunks_by_last_use(self) -> list[ChunkRecord]:
        """All indexed chunks, least recently used first (the eviction order)."""
        with self._reader() as s:
            rows = s.scalars(select(KVChunk).order_by(KVChunk.last_used_at, KVChunk.key))
            return [_chunk_record(c) for c in rows]

    def all_chunks(self) -> list[ChunkRecord]:
        """All indexed chunks, oldest first."""
        with self._reader() as s:
            rows = s.scalars(select(KVChunk).order_by(KVChunk.created_at, KVChunk.key))
            return [_chunk_record(c) for c in rows]

    # -- full-text search (migration 0004) ---------------------------------------

    def has_fts(self) -> bool:
        """Whether the database has the FTS5 index (SQLite without FTS5/trigram has none)."""
        if getattr(self, "_fts", None) is None:
            with self._reader() as s:
                found = s.execute(
                    text("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (:a, :b)"),
                    {"a": FTS_TABLES[0], "b": FTS_TABLES[1]},
                ).scalar()
            self._fts = found == len(FTS_TABLES)
        return self._fts

    def _query_clause(self, query: str) -> ColumnElement[bool]:
        """Conversations whose title or a message contains `query`: by the FTS5 index when it
        can answer (three characters or more), else a Unicode case-folding scan."""
        phrase = fts_phrase(query) if self.has_fts() else None
        if phrase is not None:
            in_messages = select(Message.conversation_id).where(
                Message.id.in_(
                    select(literal_column("rowid"))
                    .select_from(table("messages_fts"))
                    .where(literal_column("messages_fts").op("MATCH")(phrase))
                )
            )
            in_titles = (
                select(literal_column("rowid"))
                .select_from(table("conversations_fts"))
                .where(literal_column("conversations_fts").op("MATCH")(phrase))
            )
            return Conversation.id.in_(in_messages) | Conversation.id.in_(in_titles)
        needle = query.casefold()
        fold = func.chatkv_casefold  # registered on each connection by chatkv.store.db
        in_messages = (
            select(Message.id)
            .where(Message.conversation_id == Conversation.id)
            .where(func.instr(fold(Message.content), needle) > 0)
            .exists()
        )
        return (func.instr(fold(Conversation.title), needle) > 0) | in_messages

    def search(
        self,
        query: str,
        limit: int = 50,
        mark: tuple[str, str] = ("[", "]"),
        conversation_ids: Sequence[int] | None = None,
    ) -> list[SearchHit]:
        """Titles, then messages, containing `query` (case-insensitive), best match first, each
        with the match in context between `mark`s. At most `limit` hits (>= 1); only in
        `conversation_ids` when given."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if not query:
            return []
        phrase = fts_phrase(query) if self.has_fts() else None
        ids = None if conversation_ids is None else list(conversation_ids)
        with self._reader() as s:
            if phrase is None:
                return self._scan(s, query, limit, mark, ids)
            args: dict[str, Any] = {"q": phrase, "a": mark[0], "b": mark[1], "n": SNIPPET_TOKENS}
            args["limit"] = limit
            within = ""
            if ids is not None:
                within, args["ids"] = " AND c.id IN :ids", ids

            def query_text(sql: str):
                stmt = text(sql.replace("{within}", within))
                return stmt.bindparams(bindparam("ids", expanding=True)) if ids is not None else stmt

            titles = s.execute(
                query_text(
                    "SELECT c.id, c.title, snippet(conversations_fts, 0, :a, :b, '…', :n) "
                    "FROM conversations_fts JOIN conversations c ON c.id = conversations_fts.rowid "
                    "WHERE conversations_fts MATCH :q{within} ORDER BY rank LIMIT :limit"
                ),
                args,
            ).all()
            msgs = s.execute(
                query_text(
                    "SELECT m.conversation_id, c.title, m.id, m.role, "
                    "snippet(messages_fts, 0, :a, :b, '…', :n) "
                    "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
                    "JOIN conversations c ON c.id = m.conversation_id "
                    "WHERE messages_fts MATCH :q{within} ORDER BY rank LIMIT :limit"
                ),
                args,
            ).all()
        hits = [SearchHit(cid, title, None, "title", snip) for cid, title, snip in titles]
        hits += [SearchHit(cid, title, mid, role, snip) for cid, title, mid, role, snip in msgs]
        return hits[:limit]

    @staticmethod
    def _scan(
        s: Session, query: str, limit: int, mark: tuple[str, str], ids: list[int] | None
    ) -> list[SearchHit]:
        needle = query.casefold()
        fold = func.chatkv_casefold
        in_titles = select(Conversation).where(func.instr(fold(Conversation.title), needle) > 0)
        in_messages = (
            select(Message, Conversation.title)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(func.instr(fold(Message.content), needle) > 0)
            .order_by(Message.id.desc())
        )
        if ids is not None:
            in_titles = in_titles.where(Conversation.id.in_(ids))
            in_messages = in_messages.where(Conversation.id.in_(ids))
        hits = [
            SearchHit(c.id, c.title, None, "title", substring_snippet(c.title, query, mark))
            for c in s.scalars(in_titles.limit(limit))
        ]
        rows = s.execute(in_messages.limit(limit)).all()
        hits += [
            SearchHit(m.conversation_id, title, m.id, m.role, substring_snippet(m.content, query, mark))
            for m, title in rows
        ]
        return hits[:limit]

    # -- import (chatkv import) ----------------------------------------------------

    def imported_sources(self) -> set[str]:
        """The source ids of every conversation imported so far ("llm:01J…", "chatgpt:…")."""
        with self._reader() as s:
            rows = s.execute(
                text(
                    "SELECT json_extract(settings, '$.imported_from') FROM conversations "
                    "WHERE json_valid(settings) AND json_extract(settings, '$.imported_from') IS NOT NULL"
                )
            ).scalars()
            return {str(r) for r in rows}

    def import_conversation(
        self,
        source: str,
        title: str,
        model: str,
        system_prompt: str,
        messages: Sequence[tuple[str, str, datetime | None]],
        created_at: datetime | None = None,
    ) -> ConversationSummary | None:
        """Create a conversation with all its messages ((role, content, created_at) each) in one
        transaction, remembering `source` in its settings so that importing it again does
        nothing: returns None then. Raises ValueError for a role other than system/user/assistant."""
        for role, _, _ in messages:
            if role not in ROLES:
                raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        now = utcnow()
        start = created_at or now
        last = max([start, *(t for _, _, t in messages if t is not None)])
        first_user = next((c for r, c, _ in messages if r == "user"), "")
        with self._writer.begin() as s:
            taken = s.execute(
                text(
                    "SELECT 1 FROM conversations WHERE json_valid(settings) "
                    "AND json_extract(settings, '$.imported_from') = :source LIMIT 1"
                ),
                {"source": source},
            ).first()
            if taken is not None:
                return None
            conv = Conversation(
                title=(title.strip()[:TITLE_CHARS].rstrip() if title.strip() else _title_from(first_user)),
                model=model,
                system_prompt=system_prompt,
                settings=_settings_json({"imported_from": source}),
                created_at=start,
                updated_at=last,
                kv_tokens=0,
            )
            s.add(conv)
            s.flush()
            for position, (role, content, at) in enumerate(messages):
                s.add(
                    Message(
                        conversation_id=conv.id,
                        position=position,
                        role=role,
                        content=content,
                        created_at=at or start,
                    )
                )
            s.flush()
            return self._summaries(s, [conv])[0]
