"""Full-text search support: the FTS5 tables that migration 0004 adds, and how a user's
query becomes an FTS5 query.

The tables use the trigram tokenizer: any text of three characters or more is looked up
in the index as a substring (case-insensitive), quoted as one FTS5 phrase so that no
character in it is query syntax. Shorter text, or a database without the index, is
searched as before: a Unicode case-folding substring scan.
"""

from __future__ import annotations

from dataclasses import dataclass

FTS_TABLES = ("messages_fts", "conversations_fts")
MIN_CHARS = 3  # the trigram tokenizer cannot look up less
SNIPPET_TOKENS = 48  # tokens of context snippet() gives (one trigram per character)


@dataclass
class SearchHit:
    """One match: a message (message_id set) or a conversation's title (message_id None)."""

    conversation_id: int
    title: str
    message_id: int | None
    role: str  # "user", "assistant", "system", or "title"
    snippet: str  # the match in context, the matched text between the two marks


def fts_phrase(query: str) -> str | None:
    """The FTS5 query matching `query` as a substring, or None when the index cannot
    answer it (too short, or nothing but spaces)."""
    if len(query.strip()) < MIN_CHARS or len(query) < MIN_CHARS:
        return None
    return '"' + query.replace('"', '""') + '"'


def is_fts_table(name: str | None) -> bool:
    """Whether a table name is one of the FTS5 tables or their shadow tables."""
    return bool(name) and any(name == t or name.startswith(t + "_") for t in FTS_TABLES)


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Alembic's include_object hook: the FTS5 tables (and PostgreSQL's trigram indexes,
    its equivalent) are raw SQL with no ORM model, so autogenerate leaves them out of its
    comparison."""
    if type_ == "index" and name and name.endswith("_trgm"):
        return False
    return not (type_ == "table" and is_fts_table(name))


def substring_snippet(text: str, query: str, mark: tuple[str, str], width: int = 60) -> str:
    """A snippet made in Python (no index): `width` characters around the first match."""
    i = text.casefold().find(query.casefold())
    if i < 0 or len(text.casefold()) != len(text):  # folding changed lengths: match by lower()
        i = text.lower().find(query.lower())
    if i < 0:
        return text[:width] + ("…" if len(text) > width else "")
    start = max(0, i - width // 2)
    end = min(len(text), i + len(query) + width // 2)
    head = "…" if start else ""
    tail = "…" if end < len(text) else ""
    return (
        f"{head}{text[start:i]}{mark[0]}{text[i : i + len(query)]}{mark[1]}{text[i + len(query) : end]}{tail}"
    )
