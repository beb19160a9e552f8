"""Sequence reports: which email an event is about, and when SendGrid delivered each email.

``event.message_id`` copies the ``nurture_message_id`` an email's opens, clicks, bounces and
spam reports carry in their properties into an indexed column, so a report joins 5M events
to their messages without parsing JSON. ``message.delivered_at`` records SendGrid's
``delivered`` event; emails sent before this revision have none (their delivery was not kept).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa

import db.models
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TIMESTAMP = db.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.add_column("event", sa.Column("message_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True))
    op.add_column("message", sa.Column("delivered_at", _TIMESTAMP, nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE event SET message_id = (properties->>'nurture_message_id')::bigint "
            "WHERE properties->>'nurture_message_id' ~ '^[0-9]{1,18}$'"
        )
    else:
        op.execute(
            "UPDATE event SET message_id = CAST(json_extract(properties, '$.nurture_message_id') AS INTEGER) "
            "WHERE json_extract(properties, '$.nurture_message_id') IS NOT NULL "
            "AND CAST(json_extract(properties, '$.nurture_message_id') AS TEXT) NOT GLOB '*[^0-9]*' "
            "AND length(CAST(json_extract(properties, '$.nurture_message_id') AS TEXT)) BETWEEN 1 AND 18"
        )
    # Kind and time in the index too: the report reads 5M events' kinds from the index alone.
    op.create_index(
        "ix_event_message",
        "event",
        ["message_id", "kind", "occurred_at"],
        postgresql_where=sa.text("message_id IS NOT NULL"),
        sqlite_where=sa.text("message_id IS NOT NULL"),
    )
    op.create_index("ix_message_sent_at", "message", ["sent_at"])


def downgrade() -> None:
    op.drop_index("ix_message_sent_at", table_name="message")
    op.drop_index("ix_event_message", table_name="event")
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("delivered_at")
    with op.batch_alter_table("event", schema=None) as batch_op:
        batch_op.drop_column("message_id")
