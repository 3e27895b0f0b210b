"""An earlier version of a message after an edited position belongs to the branch that
the edit set aside.

Why: a reply's earlier versions were every version kept at its position, whatever question
they answered. After an edit, the versions dialog of the new reply offered the replies to
the old question, and restoring one paired the edited question with an answer to another.
`hidden_by` holds the group (the turn) that set such a version's branch aside: an edit,
or a restore, at position p hides the versions listed after p under its own group, and
restoring that group lists them again. Versions kept before this revision have none (they
stay listed; the branch they belonged to was not recorded).

- Upgrade adds the nullable column (SQLite: ALTER TABLE ADD COLUMN, no rebuild) and an
  index on group_id (each listed version's group is looked up).
- Downgrade drops both; on SQLite 3.35+ in place (ALTER TABLE DROP COLUMN), which keeps the
  AUTOINCREMENT counter a batch rebuild would reset.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("message_versions", sa.Column("hidden_by", sa.String(), nullable=True))
    # a version's group is looked up for every version listed (where does it start?)
    op.create_index("ix_message_versions_group_id", "message_versions", ["group_id"])


def downgrade() -> None:
    op.drop_index("ix_message_versions_group_id", table_name="message_versions")
    if op.get_bind().dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 35):
        # in place: a batch rebuild would reset the AUTOINCREMENT counter (ids handed out again)
        op.execute("ALTER TABLE message_versions DROP COLUMN hidden_by")
    else:
        with op.batch_alter_table("message_versions", table_kwargs={"sqlite_autoincrement": True}) as batch:
            batch.drop_column("hidden_by")
