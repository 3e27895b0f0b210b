"""Each conversation's pointer into the chunk index moves into the chunk index's own table.

Why: `conversations.kv_head`, `kv_tokens` and `kv_fingerprint` made the KV layer read and
write the transcript's table (issue 10: kv reaches the database through the chunk index
alone). `kv_heads` holds the same three facts, one row per conversation that has spilled a
cache, owned by the chunk index and gone with its conversation (ON DELETE CASCADE).

- The rows are copied over, then the columns dropped. SQLite's batch mode rebuilds
  `conversations` (copy, drop, rename): foreign keys are off while migrating
  (chatkv.store.db.upgrade), so the drop cascades nowhere; AUTOINCREMENT is kept, and so
  is its counter (an id is never handed out twice, a deleted one's neither); the triggers on `conversations` (0004's full-text index)
  go with the old table and are created again as they were.
- Downgrade copies the rows back into the columns and drops the table.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _triggers_on(table: str) -> dict[str, str]:
    """The triggers on `table`, name -> CREATE TRIGGER statement (SQLite only: a table
    rebuild drops them)."""
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        return {}
    rows = conn.execute(
        sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :t"), {"t": table}
    )
    return {name: sql for name, sql in rows}


def _alter_conversations(change: Callable[[BatchOperations], None]) -> None:
    """Apply `change` to `conversations` in batch mode, keeping its AUTOINCREMENT and, when
    the table was rebuilt, creating its triggers again."""
    triggers = _triggers_on("conversations")
    conn = op.get_bind()
    seq = _last_id_handed_out(conn)
    with op.batch_alter_table("conversations", table_kwargs={"sqlite_autoincrement": True}) as batch:
        change(batch)
    left = _triggers_on("conversations")
    for name, ddl in triggers.items():
        if name not in left:
            conn.exec_driver_sql(ddl)
    # The rebuilt table's counter starts from the largest id left: a deleted newest
    # conversation's id would be handed out again (`ask -C N` then continues another chat).
    if seq is not None and (_last_id_handed_out(conn) or 0) < seq:
        conn.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = 'conversations'"))
        conn.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('conversations', :s)"), {"s": seq})


def _last_id_handed_out(conn: sa.Connection) -> int | None:
    """SQLite's AUTOINCREMENT counter of `conversations` (None elsewhere, or before any row)."""
    if conn.dialect.name != "sqlite":
        return None
    row = conn.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'conversations'")).first()
    return int(row[0]) if row is not None else None


def upgrade() -> None:
    op.create_table(
        "kv_heads",
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(), nullable=True),
        sa.Column("tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("fingerprint", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_kv_heads_conversation_id_conversations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", name="pk_kv_heads"),
    )
    op.create_index("ix_kv_heads_key", "kv_heads", ["key"])
    op.execute(
        "INSERT INTO kv_heads (conversation_id, key, tokens, fingerprint) "
        "SELECT id, kv_head, kv_tokens, kv_fingerprint FROM conversations "
        "WHERE kv_head IS NOT NULL OR kv_tokens != 0 OR kv_fingerprint IS NOT NULL"
    )

    def drop(batch: BatchOperations) -> None:
        batch.drop_column("kv_fingerprint")
        batch.drop_column("kv_tokens")
        batch.drop_column("kv_head")

    _alter_conversations(drop)


def downgrade() -> None:
    def add(batch: BatchOperations) -> None:
        batch.add_column(sa.Column("kv_head", sa.String(), nullable=True))
        batch.add_column(sa.Column("kv_tokens", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("kv_fingerprint", sa.String(), nullable=True))

    _alter_conversations(add)
    for column, source in (("kv_head", "key"), ("kv_tokens", "tokens"), ("kv_fingerprint", "fingerprint")):
        op.execute(
            f"UPDATE conversations SET {column} = (SELECT {source} FROM kv_heads "
            "WHERE kv_heads.conversation_id = conversations.id) "
            "WHERE id IN (SELECT conversation_id FROM kv_heads)"
        )
    op.drop_index("ix_kv_heads_key", table_name="kv_heads")
    op.drop_table("kv_heads")
