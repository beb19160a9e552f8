"""Ids are never reused: SQLite's lead and message tables get AUTOINCREMENT.

Without it SQLite gives a new row the largest id + 1, so after `nurture forget`
erased the newest lead, the next lead took its id: the forgotten person's old
unsubscribe link then unsubscribed someone else, and a late SendGrid event for
an erased message settled a new one. PostgreSQL's identity columns never reuse.
Rebuilding the tables keeps every row, index and id; `upgrade_schema` switches
SQLite's foreign keys off around it, so the rebuild does not cascade.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLES = ("lead", "message")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
