"""Step-by-step sequences: an enrollment remembers the steps it took and when the next is due.

Before 0006 a transition queued every step of a sequence at once. Now an
enrollment holds ``steps_done``, ``last_step_at`` and ``next_due_at``, and the
next step is decided only when it is due, under the playbook of that moment.
Existing rows move over without sending anything twice or dropping a due step:

- every message gets its step id: the template's name, which is what a step's
  ``id`` defaults to; and the playbook version of the transition that queued it;
- in an active enrollment, the first message not yet settled (queued, claimed or
  sending) stays as the step in flight, untouched; the queued ones after it are
  cancelled: they are decided again, one at a time, when they are due under the
  playbook as it is then (so a step removed meanwhile is not sent);
- an active enrollment with nothing in flight is due now: the next cycle takes its
  next step, or completes it;
- ``steps_done`` holds the steps of every message that was not cancelled here.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

import db.models
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

CHUNK = 5_000
_TIMESTAMP = db.models.UTCDateTime(timezone=True)
_UNSETTLED = ("queued", "claimed", "sending")
REQUEUED = (
    "not queued ahead any more: sequences are walked one step at a time (migration 0006); "
    "this step is decided again when it is due"
)


def _when(value: Any) -> datetime | None:
    """A timestamp as the raw driver returns it (naive UTC text on SQLite), aware UTC."""
    if value is None:
        return None
    when: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _schema() -> None:
    op.add_column("enrollment", sa.Column("steps_done", sa.JSON(), nullable=False, server_default="[]"))
    op.add_column("enrollment", sa.Column("last_step_at", _TIMESTAMP, nullable=True))
    op.add_column("enrollment", sa.Column("next_due_at", _TIMESTAMP, nullable=True))
    op.create_index(
        "ix_enrollment_next_due",
        "enrollment",
        ["next_due_at"],
        postgresql_where=sa.text("next_due_at IS NOT NULL"),
        sqlite_where=sa.text("next_due_at IS NOT NULL"),
    )
    op.add_column("message", sa.Column("step_id", sa.String(length=100), nullable=False, server_default=""))
    op.add_column(
        "message", sa.Column("playbook_version", sa.String(length=32), nullable=False, server_default="")
    )
    op.create_table(
        "sequence_pause",
        sa.Column("sequence", sa.String(length=100), primary_key=True),
        sa.Column("paused_at", _TIMESTAMP, nullable=False),
        sa.Column("reason", sa.String(length=300), nullable=True),
    )


def upgrade() -> None:
    _schema()
    connection = op.get_bind()
    connection.execute(sa.text("UPDATE message SET step_id = template"))
    connection.execute(
        sa.text(
            "UPDATE message SET playbook_version = COALESCE((SELECT t.playbook_version FROM enrollment e "
            "JOIN stage_transition t ON t.id = e.transition_id WHERE e.id = message.enrollment_id), '')"
        )
    )
    now = datetime.now(UTC)
    last = 0
    while True:
        enrollments = connection.execute(
            sa.text("SELECT id, state, started_at FROM enrollment WHERE id > :last ORDER BY id LIMIT :n"),
            {"last": last, "n": CHUNK},
        ).all()
        if not enrollments:
            return
        last = enrollments[-1][0]
        messages: dict[int, list[Any]] = defaultdict(list)
        for row in connection.execute(
            sa.text(
                "SELECT id, enrollment_id, step, template, status, sent_at, updated_at FROM message "
                "WHERE enrollment_id >= :first AND enrollment_id <= :last ORDER BY enrollment_id, step, id"
            ),
            {"first": enrollments[0][0], "last": last},
        ):
            messages[row[1]].append(row)
        changes: list[dict[str, Any]] = []
        requeued: list[dict[str, Any]] = []
        for ident, state, started_at in enrollments:
            rows = messages.get(ident, [])
            in_flight = next((m for m in rows if m[4] in _UNSETTLED), None) if state == "active" else None
            steps: list[str] = []
            settled_at = [_when(started_at)]
            for message in rows:
                later_queued = in_flight is not None and message[2] > in_flight[2] and message[4] == "queued"
                if later_queued:
                    requeued.append({"id": message[0], "at": now})
                elif message[4] != "cancelled":
                    steps.append(message[3])
                    if message[4] not in _UNSETTLED:
                        settled_at.append(_when(message[5]) or _when(message[6]))
            due = now if state == "active" and in_flight is None else None
            changes.append(
                {
                    "id": ident,
                    "steps": steps,
                    "last_step_at": max(t for t in settled_at if t is not None),
                    "due": due,
                }
            )
        connection.execute(
            sa.text(
                "UPDATE enrollment SET steps_done = :steps, last_step_at = :last_step_at, next_due_at = :due "
                "WHERE id = :id"
            ).bindparams(
                sa.bindparam("steps", type_=sa.JSON()),
                sa.bindparam("last_step_at", type_=_TIMESTAMP),
                sa.bindparam("due", type_=_TIMESTAMP),
            ),
            changes,
        )
        if requeued:
            connection.execute(
                sa.text(
                    "UPDATE message SET status = 'cancelled', last_error = :why, updated_at = :at "
                    "WHERE id = :id AND status = 'queued'"
                ).bindparams(sa.bindparam("at", type_=_TIMESTAMP)),
                [dict(item, why=REQUEUED) for item in requeued],
            )


def downgrade() -> None:
    op.drop_table("sequence_pause")
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("playbook_version")
        batch_op.drop_column("step_id")
    op.drop_index("ix_enrollment_next_due", table_name="enrollment")
    with op.batch_alter_table("enrollment", schema=None) as batch_op:
        batch_op.drop_column("next_due_at")
        batch_op.drop_column("last_step_at")
        batch_op.drop_column("steps_done")
