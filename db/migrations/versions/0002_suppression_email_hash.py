"""Suppressions are found by the hash of the address, so a forgotten address stays suppressed.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("suppression", schema=None) as batch_op:
        batch_op.add_column(sa.Column("email_hash", sa.String(length=64), nullable=True))
    connection = op.get_bind()
    rows = connection.execute(sa.text("SELECT id, email FROM suppression")).fetchall()
    for row_id, email in rows:
        connection.execute(
            sa.text("UPDATE suppression SET email_hash = :hash WHERE id = :id"),
            {"hash": hashlib.sha256(email.encode("utf-8")).hexdigest(), "id": row_id},
        )
    with op.batch_alter_table("suppression", schema=None) as batch_op:
        batch_op.alter_column("email_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("email", existing_type=sa.String(length=320), nullable=True)
        batch_op.drop_index("ix_suppression_email")
        batch_op.create_index("ix_suppression_email", ["email"], unique=False)
        batch_op.create_index("ix_suppression_email_hash", ["email_hash"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("suppression", schema=None) as batch_op:
        batch_op.drop_index("ix_suppression_email_hash")
        batch_op.drop_index("ix_suppression_email")
        batch_op.create_index("ix_suppression_email", ["email"], unique=True)
        batch_op.drop_column("email_hash")
