"""Dispatch: claim due messages in batches, render, hand to the transport, record the outcome.

The message table is a transactional outbox. A batch is claimed in its own
short transaction (status ``sending`` with a lease; ``FOR UPDATE SKIP LOCKED``
on PostgreSQL so dispatchers never claim the same row), sent with no
transaction open, and its outcomes written in one more. Suppression is checked
when a message is claimed, not only when it was queued.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, exists, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import PROFILE_COLUMNS
from db.engine import session_scope
from db.models import Enrollment, Lead, Message, Suppression
from nurture.errors import (
    AmbiguousDeliveryError,
    PermanentDeliveryError,
    TemplateError,
    TransientDeliveryError,
)
from nurture.playbook import Playbook
from nurture.rendering import EmailRenderer, email_context
from nurture.transports.base import EmailTransport, OutgoingEmail
from nurture.unsubscribe import unsubscribe_url

LEASE = timedelta(minutes=10)
MAX_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Sender:
    """Who the emails come from and where their links point."""

    from_email: str
    postal_address: str
    public_url: str
    secret_key: str


@dataclass
class DispatchResult:
    by_status: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: DispatchResult) -> None:
        self.by_status.update(other.by_status)
        self.failures.extend(other.failures)

    @property
    def claimed(self) -> int:
        return sum(self.by_status.values())


def claim_due_messages(*, session: Session, now: datetime, limit: int) -> list[int]:
    """Mark up to ``limit`` due messages as ``sending`` under a lease; returns their ids."""
    query = (
        select(col(Message.id))
        .where(col(Message.status) == "queued", col(Message.due_at) <= now)
        .order_by(col(Message.due_at), col(Message.id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = [int(i) for i in session.scalars(query) if i is not None]
    if ids:
        session.execute(
            update(Message)
            .where(col(Message.id).in_(ids))
            .values(status="sending", lease_until=now + LEASE, attempts=col(Message.attempts) + 1, updated_at=now)
        )
    return ids


def _load_claimed(session: Session, ids: list[int]) -> list[Any]:
    profile = [getattr(Lead, c) for c in PROFILE_COLUMNS]
    query = (
        select(
            col(Message.id),
            col(Message.lead_id),
            col(Message.sequence),
            col(Message.step),
            col(Message.template),
            col(Message.subject_template),
            col(Message.idempotency_key),
            col(Message.attempts),
            col(Lead.stage),
            col(Lead.score),
            col(Lead.suppressed),
            col(Suppression.reason).label("suppression_reason"),
            *profile,
        )
        .join(Lead, col(Lead.id) == col(Message.lead_id))
        .outerjoin(Suppression, col(Suppression.email) == col(Lead.email))
        .where(col(Message.id).in_(ids))
        .order_by(col(Message.id))
    )
    return list(session.execute(query))


def _backoff(attempts: int) -> timedelta:
    return timedelta(minutes=min(2**attempts, 60))


def send_claimed(
    rows: list[Any],
    *,
    playbook: Playbook,
    renderer: EmailRenderer,
    transport: EmailTransport,
    sender: Sender,
    now: datetime,
) -> tuple[list[dict[str, Any]], DispatchResult]:
    """Send each claimed message; returns the row updates to write and the tally."""
    updates: list[dict[str, Any]] = []
    result = DispatchResult()
    for row in rows:
        outcome: dict[str, Any] = {"id": row.id, "lease_until": None, "updated_at": now}
        reason = row.suppressed or row.suppression_reason
        if reason:
            outcome.update(status="suppressed", last_error=f"address suppressed: {reason}")
        else:
            outcome.update(_deliver(row, playbook, renderer, transport, sender, now))
        updates.append(outcome)
        result.by_status[outcome["status"]] += 1
        if outcome["status"] in {"failed", "suppressed"}:
            result.failures.append(
                {
                    "message_id": row.id,
                    "lead_id": row.lead_id,
                    "template": row.template,
                    "status": outcome["status"],
                    "reason": outcome.get("last_error", ""),
                }
            )
    return updates, result


def _deliver(
    row: Any, playbook: Playbook, renderer: EmailRenderer, transport: EmailTransport, sender: Sender, now: datetime
) -> dict[str, Any]:
    lead = {c: getattr(row, c) for c in PROFILE_COLUMNS} | {"stage": row.stage, "score": row.score}
    link = unsubscribe_url(sender.public_url, row.lead_id, secret=sender.secret_key)
    try:
        rendered = renderer.render(
            template=row.template,
            subject=row.subject_template,
            context=email_context(
                playbook,
                lead=lead,
                unsubscribe_url=link,
                postal_address=sender.postal_address,
                sequence=row.sequence,
                step=row.step,
            ),
        )
    except TemplateError as exc:
        return {"status": "failed", "last_error": f"template error: {exc}"}
    email = OutgoingEmail(
        message_id=row.id,
        idempotency_key=row.idempotency_key,
        to_email=row.email,
        from_email=sender.from_email,
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        unsubscribe_url=link,
        category=row.sequence,
        date=now,
        custom_args={"nurture_message_id": str(row.id)},
    )
    try:
        provider_id = transport.send(email)
    except PermanentDeliveryError as exc:
        return {"status": "failed", "last_error": str(exc), "subject": rendered.subject}
    except AmbiguousDeliveryError as exc:
        # Left `sending` and never claimed again: the provider's events settle it.
        return {"status": "sending", "last_error": f"outcome unknown, not retried: {exc}", "subject": rendered.subject}
    except TransientDeliveryError as exc:
        if row.attempts >= MAX_ATTEMPTS:
            return {"status": "failed", "last_error": f"gave up after {row.attempts} attempts: {exc}"}
        wait = timedelta(seconds=exc.retry_after_seconds) if exc.retry_after_seconds else _backoff(row.attempts)
        return {"status": "queued", "due_at": now + wait, "last_error": str(exc)}
    return {
        "status": "sent",
        "sent_at": now,
        "provider_message_id": provider_id,
        "subject": rendered.subject,
        "last_error": None,
    }


def _complete_enrollments(session: Session, message_ids: list[int], now: datetime) -> None:
    """An active enrollment with nothing left queued or sending is completed."""
    enrollment_ids = select(col(Message.enrollment_id)).where(col(Message.id).in_(message_ids))
    unfinished = exists().where(
        and_(col(Message.enrollment_id) == col(Enrollment.id), col(Message.status).in_(("queued", "sending")))
    )
    session.execute(
        update(Enrollment)
        .where(col(Enrollment.id).in_(enrollment_ids), col(Enrollment.state) == "active", ~unfinished)
        .values(state="completed", ended_at=now)
    )


def dispatch_due(
    *,
    engine: Engine,
    playbook: Playbook,
    renderer: EmailRenderer,
    transport: EmailTransport,
    sender: Sender,
    now: datetime,
    batch_size: int = 500,
    max_batches: int | None = None,
    on_batch: Callable[[DispatchResult], None] | None = None,
) -> DispatchResult:
    """Send every message due by ``now``, a claimed batch at a time."""
    total = DispatchResult()
    batches = 0
    while max_batches is None or batches < max_batches:
        with session_scope(engine) as session:
            ids = claim_due_messages(session=session, now=now, limit=batch_size)
            rows = _load_claimed(session, ids) if ids else []
        if not ids:
            break
        updates, result = send_claimed(
            rows, playbook=playbook, renderer=renderer, transport=transport, sender=sender, now=now
        )
        with session_scope(engine) as session:
            # Group by the keys present: executemany needs the same columns in every row.
            by_shape: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for item in updates:
                by_shape.setdefault(tuple(sorted(item)), []).append(item)
            for group in by_shape.values():
                session.execute(update(Message), group)
            _complete_enrollments(session, ids, now)
        total.add(result)
        batches += 1
        if on_batch is not None:
            on_batch(result)
    return total
