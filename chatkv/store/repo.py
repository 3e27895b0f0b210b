"""The Store: conversations, messages and the KV chunk index, behind one object.

Every method opens its own Session and returns plain dataclasses (chatkv.api's,
or ChunkRecord), so results outlive the session and a Store can be shared by
threads. Writes run in IMMEDIATE transactions (see chatkv.store.db), so two
processes writing at once wait for each other instead of failing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    delete,
    exc,
    func,
    select,
    update,
)
from sqlalchemy.orm import Session, aliased, sessionmaker

from chatkv.api import ConversationSummary, MessageView, TurnStats
from chatkv.errors import NotFoundError
from chatkv.store.chunk_index import ChunkIndex, private_keys
from chatkv.store.common import (
    _conversation_missing,
    _message_missing,
    _message_view,
    _new_message,
    _set_stats,
    _settings_json,
    _title_from,
    _version_of,
    _version_view,
    _warn_index_damaged,
    new_turn_id,
)
from chatkv.store.db import as_target, open_database, writer
from chatkv.store.finding import Finding
from chatkv.store.models import (
    ROLES,
    Conversation,
    KVChunk,
    KVHeadRow,
    Message,
    MessageVersion,
    utcnow,
)


def _new_conversation(
    title: str, model: str, system_prompt: str, settings: dict[str, Any] | None, now: datetime
) -> Conversation:
    """A conversation row, not yet added to a session."""
    return Conversation(
        title=title,
        model=model,
        system_prompt=system_prompt,
        settings=_settings_json(settings),
        created_at=now,
        updated_at=now,
    )


class Store(ChunkIndex, Finding):
    """chatkv's database. Opening it creates the file (mode 0600) and upgrades the schema.

    Args:
        path: the SQLite file, usually chatkv.paths.db_path(), or a database URL
            (chatkv.store.db.database_target(settings) picks one).

    Raises:
        ChatKVError: the file is not a SQLite database, or was written by a newer chatkv.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = as_target(path)
        self._engine = open_database(self.path)
        # A Session per call. Reads begin DEFERRED (a consistent snapshot); writes go
        # through _writer.begin(), IMMEDIATE, so they queue for the write lock.
        self._reader = sessionmaker(self._engine, expire_on_commit=False)
        self._writer = sessionmaker(writer(self._engine), expire_on_commit=False)

    @property
    def engine(self) -> Any:
        """The database engine: what a conversation's lease locks on PostgreSQL (chatkv.lease)."""
        return self._engine

    def close(self) -> None:
        """Close pooled connections. Safe to call twice."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- conversations ---------------------------------------------------------

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
        # The tokens each conversation's cache covers (the chunk index's kv_heads).
        tokens: dict[int, int] = dict(
            s.execute(
                select(KVHeadRow.conversation_id, KVHeadRow.tokens).where(KVHeadRow.conversation_id.in_(ids))
            ).all()
        )
        # Each conversation's chain from its kv head to the root. UNION (not UNION ALL)
        # stops on a repeated row, so even a corrupt, cyclic index terminates.
        chain = (
            select(KVHeadRow.conversation_id, KVChunk.key, KVChunk.parent, KVChunk.nbytes)
            .select_from(KVHeadRow)
            .join(KVChunk, KVChunk.key == KVHeadRow.key)
            .where(KVHeadRow.conversation_id.in_(ids))
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
                token_count=tokens.get(c.id, 0),
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
        messages: Sequence[tuple[str, str]] = (),
    ) -> ConversationSummary:
        """Create a conversation holding `messages` ((role, content) each; none: an empty one),
        in one transaction. Without a title it takes the first line of its first user message.
        `settings` (generation settings) must be JSON-serializable. Raises ValueError for a
        role other than system/user/assistant."""
        now = utcnow()
        first_user = next((c for r, c in messages if r == "user"), "")
        conv = _new_conversation(title or _title_from(first_user), model, system_prompt, settings, now)
        with self._writer.begin() as s:
            s.add(conv)
            s.flush()
            for position, (role, content) in enumerate(messages):
                s.add(_new_message(conv.id, position, role, content, now))
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

    def delete_conversation(self, conversation_id: int) -> list[str]:
        """Delete the conversation and its messages. Its chunks stay (they may be shared);
        returned are the keys of those only it recorded, read in the same transaction as the
        delete (after it, a spill still running for it records nothing). Raises NotFoundError."""
        with self._writer.begin() as s:
            private = private_keys(s, conversation_id)
            result = s.execute(delete(Conversation).where(Conversation.id == conversation_id))
            if result.rowcount == 0:
                raise _conversation_missing(conversation_id)
        if self._dialect() == "sqlite":
            # The write-ahead log still holds the deleted pages as they were (secure_delete
            # clears the database file's): copy the log into the file and empty it now, not at
            # some later checkpoint. Best effort: a reader in another process holding an old
            # snapshot keeps the log until it is done (the next delete or close truncates it).
            raw = self._writer.kw["bind"].raw_connection()  # outside any transaction
            try:
                raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # busy, or read-only: the next checkpoint takes it
            finally:
                raw.close()
        return private

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
        conv = _new_conversation(title or _title_from(text), model, system_prompt, settings, now)
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
        model: str = "",
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
            model: the model that wrote the reply, recorded as the conversation's model (a
                conversation continued with another model goes on with that one); "": unchanged.

        Idempotent: a reply already saved under `turn_id` is returned as it is (a journal
        replayed after a crash saves nothing twice). Raises NotFoundError.
        """
        with self._writer.begin() as s:
            return self._finish(s, conversation_id, content, stats, turn_id, set_aside, edit, add, model)

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
        model: str,
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
            if rows:
                _hide_versions_after(s, conversation_id, rows[0].position, turn_id)
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
        if model:
            conv.model = model
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
        conv = _new_conversation("", model, system_prompt, settings, now)
        with self._writer.begin() as s:
            s.add(conv)
            s.flush()
            msg = self._finish(s, conv.id, reply, stats, turn_id, (), None, messages, "")
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
                    MessageVersion.hidden_by.is_(None),
                    MessageVersion.position == _group_start(MessageVersion.group_id),
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
            start = None if v is None else s.scalar(select(_group_start(v.group_id)))
            if (
                v is None
                or v.hidden_by is not None  # another branch's: listed once that is restored
                or (v.conversation_id, v.position) != (msg.conversation_id, msg.position)
                or v.position != start  # a later message of the group: restored with its first
            ):
                raise NotFoundError(
                    f"version {version_id} is not an earlier version of message {message_id}; "
                    "`chatkv show` lists a conversation's messages"
                )
            branch = v.group_id
            group = s.scalars(
                select(MessageVersion)
                .where(MessageVersion.group_id == branch, MessageVersion.position >= v.position)
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
            s.flush()
            _hide_versions_after(s, msg.conversation_id, msg.position, aside)
            s.execute(update(MessageVersion).where(MessageVersion.hidden_by == branch).values(hidden_by=None))
            s.get(Conversation, msg.conversation_id).updated_at = now


def _group_start(group_id: Any) -> Any:
    """The first position of the versions set aside with `group_id` (a correlated subquery)."""
    other = aliased(MessageVersion)
    return select(func.min(other.position)).where(other.group_id == group_id).scalar_subquery()


def _hide_versions_after(s: Session, conversation_id: int, position: int, group_id: str) -> None:
    """The versions listed after `position` belong to the branch `group_id` just set aside
    (an edit or restore there): hide them under it until it is restored. Without this a
    reply's versions dialog offered answers to the question before the edit."""
    s.execute(
        update(MessageVersion)
        .where(
            MessageVersion.conversation_id == conversation_id,
            MessageVersion.position > position,
            MessageVersion.group_id != group_id,
            MessageVersion.hidden_by.is_(None),
        )
        .values(hidden_by=group_id)
    )
