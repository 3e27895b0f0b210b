"""The KV chunk index, and each conversation's pointer into it.

Why: KV caches are spilled to disk as content-addressed chunk files; the index
finds a chunk by key (or its partial successors by parent) without touching the
file system, and orders chunks by last use for eviction. A conversation keeps the
key of the newest chunk spilled for it (kv_head), the tokens that chain covers and
the model fingerprint it was made under, so listing and resuming need no hashing.
kv_head is not a foreign key: chunks are shared between conversations and evicted
on their own.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "kv_chunks",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("parent", sa.String(), nullable=True),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.Column("codec", sa.String(), nullable=False),
        sa.Column("start", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("partial", sa.Boolean(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("nbytes", sa.Integer(), nullable=False),
        sa.Column("checksum", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_kv_chunks"),
    )
    op.create_index("ix_kv_chunks_parent", "kv_chunks", ["parent"])
    op.create_index("ix_kv_chunks_last_used_at", "kv_chunks", ["last_used_at"])

    # Nullable columns and a NOT NULL one with a default: SQLite adds these in
    # place (ALTER TABLE ADD COLUMN); batch mode would rebuild the table only if needed.
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("kv_head", sa.String(), nullable=True))
        batch.add_column(sa.Column("kv_tokens", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("kv_fingerprint", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("kv_fingerprint")
        batch.drop_column("kv_tokens")
        batch.drop_column("kv_head")
    op.drop_index("ix_kv_chunks_last_used_at", table_name="kv_chunks")
    op.drop_index("ix_kv_chunks_parent", table_name="kv_chunks")
    op.drop_table("kv_chunks")
