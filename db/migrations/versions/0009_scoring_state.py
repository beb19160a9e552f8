"""Scoring state: which scoring rules the stored scores follow, so a cycle can say a rescore is needed.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa

import db.models
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_TIMESTAMP = db.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "scoring_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scoring_version", sa.String(length=32), nullable=False),
        sa.Column("since", _TIMESTAMP, nullable=False),
        sa.Column("set_by", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("scoring_state")
