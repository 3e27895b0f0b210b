"""Turn ids, earlier versions of messages, and which chunks each conversation made.

Why:
- `messages.turn_id` (unique): a reply is saved under the id of the turn that made it,
  so a reply kept in the journal after its save failed (or after a crash) is replayed
  exactly once at the next start.
- `message_versions`: regenerate and edit no longer overwrite or delete; the messages
  they replace (and the partial reply of a stopped regenerate or edit) are kept here,
  grouped by the turn that set them aside, so they can be browsed and restored. They
  go with the conversation (ON DELETE CASCADE).
- `conversation_chunks`: the chunk keys spilled for each conversation, branches that
  an edit or regenerate left behind included, so `chatkv rm` can remove every chunk
  only that conversation used (their token ids decode back to its text).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("turn_id", sa.String(), nullable=True))
    op.create_index("ix_messages_turn_id", "messages", ["turn_id"], unique=True)
    op.create_table(
        "message_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("stats", sa.Text(), nullable=True),
        sa.Column("turn_id", sa.String(), nullable=True),
        sa.Column("group_id", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("archived_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_message_versions_conversation_id_conversations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_message_versions"),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_message_versions_conversation_id_position", "message_versions", ["conversation_id", "position"]
    )
    op.create_table(
        "conversation_chunks",
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_conversation_chunks_conversation_id_conversations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", "key", name="pk_conversation_chunks"),
    )
    op.create_index("ix_conversation_chunks_key", "conversation_chunks", ["key"])


def downgrade() -> None:
    op.drop_index("ix_conversation_chunks_key", table_name="conversation_chunks")
    op.drop_table("conversation_chunks")
    op.drop_index("ix_message_versions_conversation_id_position", table_name="message_versions")
    op.drop_table("message_versions")
    op.drop_index("ix_messages_turn_id", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("turn_id")
