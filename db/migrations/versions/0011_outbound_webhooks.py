"""Outbound webhooks: the ``webhook_delivery`` outbox (docs/webhooks.md).

One row per fact (a transition, a conversion, a failed email) and webhook, written in the
fact's transaction; a dispatcher claims due rows under a lease, marks them ``sending``
right before each request, and records the outcome.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa

import db.models
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_TIMESTAMP = db.models.UTCDateTime(timezone=True)
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "webhook_delivery",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("lead_id", _ID, sa.ForeignKey("lead.id", ondelete="CASCADE"), nullable=False),
        sa.Column("webhook", sa.String(100), nullable=False),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("delivery_id", sa.String(36), nullable=False, unique=True),
        sa.Column("idempotency_key", sa.String(300), nullable=False, unique=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("due_at", _TIMESTAMP, nullable=False),
        sa.Column("lease_until", _TIMESTAMP, nullable=True),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("send_started_at", _TIMESTAMP, nullable=True),
        sa.Column("last_error", sa.String(2000), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("updated_at", _TIMESTAMP, nullable=False),
        sa.Column("delivered_at", _TIMESTAMP, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_webhook_delivery_status_due", "webhook_delivery", ["status", "due_at"])
    op.create_index("ix_webhook_delivery_status_lease", "webhook_delivery", ["status", "lease_until"])
    op.create_index("ix_webhook_delivery_lead", "webhook_delivery", ["lead_id"])


def downgrade() -> None:
    op.drop_table("webhook_delivery")
