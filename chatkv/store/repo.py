"""The Store: conversations, messages and the KV chunk index, behind one object.

Every method opens its own Session and returns plain dataclasses (chatkv.api's,
or ChunkRecord), so results outlive the session and a Store can be shared by
threads. Writes run in IMMEDIATE transactions (see chatkv.store.db), so two
processes writing at once wait for each other instead of failing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased, sessionmaker

from chatkv.api import ConversationSummary, MessageView, TurnStats
from chatkv.errors import NotFoundError
from chatkv.store.db import open_database, writer
from chatkv.store.models import ROLES, Conversation, KVChunk, Message, utcnow

TITLE_CHARS = 60

# Keys per IN (...) list: well under SQLite's smallest host-parameter limit (999).
_IN_BATCH = 900

_STAT_FIELDS = tuple(f.name for f in fields(TurnStats))


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
        on_disk: dict[int, int] = dict(s.execute(bytes_stmt).all())
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
                (case-insensitive, Unicode-aware).
            limit: at most this many (>= 1).
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        stmt = select(Conversation).order_by(Conversation.updated_at.desc(), Conversation.id.desc())
        if query:
            needle = query.casefold()
            fold = func.chatkv_casefold  # registered on each connection by chatkv.store.db
            in_messages = (
                select(Message.id)
                .where(Message.conversation_id == Conversation.id)
                .where(func.instr(fold(Message.content), needle) > 0)
                .exists()
            )
            stmt = stmt.where((func.instr(fold(Conversation.title), needle) > 0) | in_messages)
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
