"""Branches and split tests: an enrollment keeps the wait_for branches it took and its wait's deadline;
a message keeps the variant of its step's split test.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa

import db.models
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_TIMESTAMP = db.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.add_column("enrollment", sa.Column("branches", sa.JSON(), nullable=False, server_default="[]"))
    op.add_column("enrollment", sa.Column("waiting_until", _TIMESTAMP, nullable=True))
    op.add_column("message", sa.Column("variant", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("variant")
    with op.batch_alter_table("enrollment", schema=None) as batch_op:
        batch_op.drop_column("waiting_until")
        batch_op.drop_column("branches")
