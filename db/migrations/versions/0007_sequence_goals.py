"""Sequence goals: an enrollment can end as converted, with when and after which step.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa

import db.models
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TIMESTAMP = db.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.add_column("enrollment", sa.Column("converted_at", _TIMESTAMP, nullable=True))
    op.add_column("enrollment", sa.Column("converted_after_step", sa.String(length=100), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE enrollment SET state = 'exited' WHERE state = 'converted'")
    with op.batch_alter_table("enrollment", schema=None) as batch_op:
        batch_op.drop_column("converted_after_step")
        batch_op.drop_column("converted_at")
