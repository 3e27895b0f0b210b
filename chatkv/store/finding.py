"""Searching conversations (FTS5, migration 0004) and importing them from other tools:
the parts of the Store that `chatkv ls -q`, the sidebar filter and `chatkv import` use."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    bindparam,
    func,
    literal_column,
    select,
    table,
    text,
)
from sqlalchemy.orm import Session

from chatkv.api import ConversationSummary
from chatkv.store.common import (
    TITLE_CHARS,
    StoreBase,
    _settings_json,
    _title_from,
)
from chatkv.store.models import (
    ROLES,
    Conversation,
    Message,
    utcnow,
)
from chatkv.store.search import FTS_TABLES, SNIPPET_TOKENS, SearchHit, fts_phrase, substring_snippet


def _imported_from(dialect: str) -> tuple[str, str]:
    """SQL for a conversation's settings["imported_from"], and the condition under which it
    may be read (SQLite's json_extract needs valid JSON; settings are always written as
    JSON, which PostgreSQL's jsonb reads)."""
    if dialect == "postgresql":
        return "(CAST(settings AS jsonb) ->> 'imported_from')", "TRUE"
    return "json_extract(settings, '$.imported_from')", "json_valid(settings)"


class Finding(StoreBase):
    """The search and import part of the Store."""

    def _contains(self, haystack: Any, needle: str) -> ColumnElement[bool]:
        """Whether `haystack` (a column), case-folded, contains the case-folded `needle`."""
        fold = func.chatkv_casefold  # SQLite: registered on each connection; PostgreSQL: migration 0004
        if self._dialect() == "postgresql":
            # LIKE '%…%', which pg_trgm's indexes on chatkv_casefold(…) answer (migration 0004).
            return fold(haystack).contains(needle, autoescape=True)
        return func.instr(fold(haystack), needle) > 0

    # -- full-text search (migration 0004) ---------------------------------------

    def has_fts(self) -> bool:
        """Whether the database has the FTS5 index (SQLite without FTS5/trigram has none;
        PostgreSQL searches by _contains instead)."""
        if getattr(self, "_fts", None) is None and self._dialect() != "sqlite":
            self._fts = False
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
        in_messages = (
            select(Message.id)
            .where(Message.conversation_id == Conversation.id)
            .where(self._contains(Message.content, needle))
            .exists()
        )
        return self._contains(Conversation.title, needle) | in_messages

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
            # From here on SQLite with FTS5 (has_fts).
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

    def _scan(
        self, s: Session, query: str, limit: int, mark: tuple[str, str], ids: list[int] | None
    ) -> list[SearchHit]:
        needle = query.casefold()
        in_titles = select(Conversation).where(self._contains(Conversation.title, needle))
        in_messages = (
            select(Message, Conversation.title)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(self._contains(Message.content, needle))
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
        source, readable = _imported_from(self._dialect())
        with self._reader() as s:
            rows = s.execute(
                text(f"SELECT {source} FROM conversations WHERE {readable} AND {source} IS NOT NULL")
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
        imported_from, readable = _imported_from(self._dialect())
        with self._writer.begin() as s:
            taken = s.execute(
                text(f"SELECT 1 FROM conversations WHERE {readable} AND {imported_from} = :source LIMIT 1"),
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
