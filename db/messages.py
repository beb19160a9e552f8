"""The operator's view of the outbox: list messages, and send failed or in-doubt ones again.

An operator who fixed a broken template or waited out an outage retries the
messages it failed; one who checked SendGrid's activity feed decides about
messages left in doubt. A retry puts the message back in the queue, due now;
the contact policy and suppression still apply when it is dispatched.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from db.models import Enrollment, Lead, Message
from nurture.delivery import RETRYABLE, MessageStatus
from nurture.sequences import EnrollmentState


@dataclass(frozen=True, slots=True)
class MessageSelection:
    """Which messages an operator means: by id, template or sequence, among some statuses."""

    statuses: tuple[MessageStatus, ...] = RETRYABLE
    ids: tuple[int, ...] = ()
    template: str | None = None
    sequence: str | None = None

    def conditions(self) -> list[Any]:
        where: list[Any] = [col(Message.status).in_([s.value for s in self.statuses])]
        if self.ids:
            where.append(col(Message.id).in_(self.ids))
        if self.template:
            where.append(col(Message.template) == self.template)
        if self.sequence:
            where.append(col(Message.sequence) == self.sequence)
        return where


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: int
    email: str
    sequence: str
    step: int
    step_id: str
    template: str
    status: str
    due_at: datetime
    attempts: int
    last_error: str | None


def list_messages(*, session: Session, selection: MessageSelection, limit: int) -> list[MessageRow]:
    """The selected messages, most recently due first."""
    query = (
        select(
            col(Message.id),
            col(Lead.email),
            col(Message.sequence),
            col(Message.step),
            col(Message.step_id),
            col(Message.template),
            col(Message.status),
            col(Message.due_at),
            col(Message.attempts),
            col(Message.last_error),
        )
        .join(Lead, col(Lead.id) == col(Message.lead_id))
        .where(*selection.conditions())
        .order_by(col(Message.due_at).desc(), col(Message.id).desc())
        .limit(limit)
    )
    return [MessageRow(*row) for row in session.execute(query)]


@dataclass
class RetryPlan:
    """What a retry would do: how many of each status and template, and what it leaves alone."""

    by_status: Counter[str] = field(default_factory=Counter)
    by_template: Counter[str] = field(default_factory=Counter)
    skipped_exited: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


def _exited() -> Any:
    return select(col(Enrollment.id)).where(col(Enrollment.state) == EnrollmentState.exited)


def plan_retry(*, session: Session, selection: MessageSelection) -> RetryPlan:
    """Count what ``retry_messages`` would put back in the queue (for the confirmation)."""
    plan = RetryPlan()
    query = select(col(Message.status), col(Message.template), col(Message.enrollment_id).in_(_exited())).where(
        *selection.conditions()
    )
    for status, template, exited in session.execute(query):
        if exited:
            plan.skipped_exited += 1
            continue
        plan.by_status[status] += 1
        plan.by_template[template] += 1
    return plan


def retry_messages(*, session: Session, selection: MessageSelection, now: datetime) -> int:
    """Queue the selected messages again, due ``now``; returns how many.

    Messages of an enrollment that ended because the lead left its stage stay as
    they are: that email is no longer the right one. The enrollment walks on as it
    was (a retried email resends a step it already took), and a stage change still
    cancels a retried email that has not gone out yet.
    """
    conditions = [*selection.conditions(), ~col(Message.enrollment_id).in_(_exited())]
    ids = [int(i) for i in session.scalars(select(col(Message.id)).where(*conditions)) if i is not None]
    if not ids:
        return 0
    session.execute(
        update(Message)
        .where(col(Message.id).in_(ids))
        .values(
            status=MessageStatus.queued,
            # Due now: a message whose time had come keeps its due time (and its place in the queue).
            due_at=case((col(Message.due_at) <= now, col(Message.due_at)), else_=now),
            attempts=0,
            lease_until=None,
            claimed_by=None,
            send_started_at=None,
            last_error="queued again by an operator (`nurture messages retry`)",
            updated_at=now,
        )
    )
    return len(ids)
