"""Full-text search over messages and conversation titles (SQLite FTS5).

Why: `chatkv ls -q` and the sidebar filter scanned every message with a Python function
per row; an FTS5 index finds matches at once and gives `snippet()` to show each match in
context (`chatkv ls -q`, as `llm logs -q` does).

- `messages_fts` and `conversations_fts` are external-content FTS5 tables (the text stays
  in `messages.content` / `conversations.title`; the index holds only trigrams), with the
  `trigram` tokenizer, case-insensitive: a query matches as a substring, as the search it
  replaces did, so typing part of a word in the sidebar still finds it.
- Triggers keep both in sync on insert, delete (cascades from a deleted conversation
  included) and update. Deleting a conversation also runs FTS5's `optimize`, merging the
  index so the deleted text's trigrams are not left in old segments (`rm` means gone).
- A migration after this one that rebuilds `messages` or `conversations` (Alembic batch
  mode copies the table and drops the old one, triggers with it) must create these
  triggers again.
- SQLite builds without FTS5 or the trigram tokenizer (older than 3.34) get no index:
  the store then searches as before.
- PostgreSQL has no FTS5. Its equivalent keeps the same answers (a case-insensitive
  substring match, snippets made in Python): `chatkv_casefold(text)` (lower(), which
  SQLite's connections register in Python), and where the server has the pg_trgm
  extension, trigram GIN indexes on the folded text that `LIKE '%…%'` uses.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger(__name__)

TOKENIZE = "trigram case_sensitive 0"

TABLES = [
    f"CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id', "
    f"tokenize='{TOKENIZE}')",
    f"CREATE VIRTUAL TABLE conversations_fts USING fts5(title, content='conversations', content_rowid='id', "
    f"tokenize='{TOKENIZE}')",
]

TRIGGERS = [
    """CREATE TRIGGER messages_fts_ai AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
    END""",
    """CREATE TRIGGER messages_fts_ad AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    END""",
    """CREATE TRIGGER messages_fts_au AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
    END""",
    """CREATE TRIGGER conversations_fts_ai AFTER INSERT ON conversations BEGIN
        INSERT INTO conversations_fts(rowid, title) VALUES (new.id, new.title);
    END""",
    """CREATE TRIGGER conversations_fts_ad AFTER DELETE ON conversations BEGIN
        INSERT INTO conversations_fts(conversations_fts, rowid, title) VALUES ('delete', old.id, old.title);
        INSERT INTO conversations_fts(conversations_fts) VALUES ('optimize');
        INSERT INTO messages_fts(messages_fts) VALUES ('optimize');
    END""",
    """CREATE TRIGGER conversations_fts_au AFTER UPDATE OF title ON conversations BEGIN
        INSERT INTO conversations_fts(conversations_fts, rowid, title) VALUES ('delete', old.id, old.title);
        INSERT INTO conversations_fts(rowid, title) VALUES (new.id, new.title);
    END""",
]


PG_FUNCTION = (
    "CREATE OR REPLACE FUNCTION chatkv_casefold(text) RETURNS text "
    "LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS 'SELECT lower($1)'"
)
PG_INDEXES = [
    "CREATE INDEX ix_messages_content_trgm ON messages USING gin (chatkv_casefold(content) {ops})",
    "CREATE INDEX ix_conversations_title_trgm ON conversations USING gin (chatkv_casefold(title) {ops})",
]


def _upgrade_postgresql(conn) -> None:
    conn.exec_driver_sql(PG_FUNCTION)
    has_trgm = conn.exec_driver_sql("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'").first()
    if has_trgm is None:
        log.warning("pg_trgm is not installed on the server; searching without an index")
        return
    try:
        # A savepoint: a failure (no right to create extensions, or to use its schema) must
        # not abort the upgrade's transaction; search then scans without an index.
        with conn.begin_nested():
            # In public, not in this user's schema (chatkv.store.db.user_schema): an extension
            # exists once per database, and every user's indexes name its operator class.
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public")
            schema = conn.exec_driver_sql(
                "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                "WHERE e.extname = 'pg_trgm'"
            ).scalar()
            ops = '"' + schema.replace('"', '""') + '".gin_trgm_ops'
            for ddl in PG_INDEXES:
                conn.exec_driver_sql(ddl.format(ops=ops))
    except sa.exc.DBAPIError as e:
        log.warning("no pg_trgm indexes (%s); searching without an index", str(e.orig).splitlines()[0])


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        _upgrade_postgresql(conn)
        return
    try:
        conn.exec_driver_sql(TABLES[0])
    except sa.exc.OperationalError as e:  # no FTS5 or no trigram tokenizer in this SQLite
        log.warning("full-text search unavailable in this SQLite (%s); searching without an index", e.orig)
        return
    conn.exec_driver_sql(TABLES[1])
    for ddl in TRIGGERS:
        conn.exec_driver_sql(ddl)
    # Index what is there already.
    conn.exec_driver_sql("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
    conn.exec_driver_sql("INSERT INTO conversations_fts(conversations_fts) VALUES ('rebuild')")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_messages_content_trgm")
        op.execute("DROP INDEX IF EXISTS ix_conversations_title_trgm")
        op.execute("DROP FUNCTION IF EXISTS chatkv_casefold(text)")
        return
    for name in ("messages_fts_ai", "messages_fts_ad", "messages_fts_au"):
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    for name in ("conversations_fts_ai", "conversations_fts_ad", "conversations_fts_au"):
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.execute("DROP TABLE IF EXISTS messages_fts")
    op.execute("DROP TABLE IF EXISTS conversations_fts")
