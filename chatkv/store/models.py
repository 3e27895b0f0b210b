"""The tables, as SQLAlchemy 2.x typed declarative models.

The migrations in `migrations/versions` build the same schema; a test compares the
two with Alembic's autogenerate, so a change here needs a new migration there.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Named constraints: SQLite batch migrations recreate tables and need names to
# find a constraint again; the migrations spell out the same names.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ROLES = ("system", "user", "assistant")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite has no time zones), read back timezone-aware.

    A naive value on the way in is taken to be UTC already.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


def _without_nul(value: str | None, dialect: Dialect) -> str | None:
    """PostgreSQL text cannot hold NUL (a model can write one: a byte token): it is stored
    as U+FFFD there, or the save failed, and failed again at every replay of its journal."""
    if value is not None and dialect.name == "postgresql" and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


class StoredString(TypeDecorator[str]):
    """A string column; NUL-safe on PostgreSQL (`_without_nul`)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return _without_nul(value, dialect)


class StoredText(StoredString):
    """A text column; NUL-safe on PostgreSQL (`_without_nul`)."""

    impl = Text
    cache_ok = True  # not inherited: SQLAlchemy asks each TypeDecorator class


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), str: StoredString()}


class Conversation(Base):
    __tablename__ = "conversations"
    # AUTOINCREMENT: a deleted conversation's id is never handed out again, so an id
    # remembered by the user or another process cannot silently point elsewhere.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(default="")
    model: Mapped[str] = mapped_column(default="")
    system_prompt: Mapped[str] = mapped_column(StoredText, default="")
    settings: Mapped[str] = mapped_column(StoredText, default="{}")  # JSON object
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.position",
        cascade="all, delete-orphan",
        passive_deletes=True,  # the database's ON DELETE CASCADE does the work
    )


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "position"),
        CheckConstraint("role IN ('system', 'user', 'assistant')", name="role"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    position: Mapped[int]
    role: Mapped[str]
    content: Mapped[str] = mapped_column(StoredText)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # chatkv.api.TurnStats, for assistant turns; all NULL when there are none.
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    prefilled_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cache_source: Mapped[str | None]
    cache_load_s: Mapped[float | None] = mapped_column(Float)
    ttft_s: Mapped[float | None] = mapped_column(Float)
    decode_tps: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None]
    dropped_messages: Mapped[int | None] = mapped_column(Integer)
    codec: Mapped[str | None]
    # The turn that made this reply: a journaled reply is replayed at most once.
    turn_id: Mapped[str | None] = mapped_column(index=True, unique=True)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class MessageVersion(Base):
    """A message set aside by a regenerate or an edit (or the partial reply of a stopped
    one), kept so that nothing the user saw is lost and earlier versions can be restored.
    Rows set aside together share `group_id` (the id of the turn that set them aside); a
    message's versions are those whose group starts at its position and that no later edit
    or restore has hidden (`hidden_by`)."""

    __tablename__ = "message_versions"
    __table_args__ = (
        Index("ix_message_versions_conversation_id_position", "conversation_id", "position"),
        Index("ix_message_versions_group_id", "group_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    position: Mapped[int]
    role: Mapped[str]
    content: Mapped[str] = mapped_column(StoredText)
    stats: Mapped[str | None] = mapped_column(StoredText)  # chatkv.api.TurnStats as JSON
    turn_id: Mapped[str | None]
    group_id: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    archived_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The group that set this version's branch aside (an edit or restore at an earlier
    # position): not listed until that group is restored. None: listed.
    hidden_by: Mapped[str | None]


class ConversationChunk(Base):
    """A chunk spilled for a conversation (shared chunks have one row per conversation)."""

    __tablename__ = "conversation_chunks"

    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(primary_key=True, index=True)


class KVHeadRow(Base):
    """Which chunk chain is a conversation's cache: the newest chunk spilled for it (its
    parent chain is the cache), the tokens that chain covers and the model fingerprint it
    was made with. Owned by the chunk index (chatkv.store.chunk_index): the kv layer keeps
    it, the transcript's tables know nothing of it. A conversation without a spilled cache
    has no row."""

    __tablename__ = "kv_heads"

    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    # Not a foreign key: chunks are shared and evicted independently of conversations.
    key: Mapped[str | None] = mapped_column(index=True)
    tokens: Mapped[int] = mapped_column(default=0, server_default="0")
    fingerprint: Mapped[str | None]


class KVChunk(Base):
    """One chunk file under the kv dir. The key is content-derived (chatkv.kv.chunks.chunk_key)."""

    __tablename__ = "kv_chunks"

    key: Mapped[str] = mapped_column(primary_key=True)  # hex sha256
    parent: Mapped[str | None] = mapped_column(index=True)
    fingerprint: Mapped[str]
    codec: Mapped[str]
    start: Mapped[int]
    n_tokens: Mapped[int]
    partial: Mapped[bool]
    path: Mapped[str]  # relative to the kv dir, so the data dir can move
    nbytes: Mapped[int]
    checksum: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


__all__ = [
    "ROLES",
    "Base",
    "Conversation",
    "ConversationChunk",
    "KVChunk",
    "KVHeadRow",
    "Message",
    "MessageVersion",
    "UTCDateTime",
    "utcnow",
]
