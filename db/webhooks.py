"""The webhook outbox's reads and writes: facts' leads, enqueueing, leases, claims, ``sending`` marks, outcomes.

Like ``db/dispatch.py`` for email, each function is one short statement or two in the
caller's transaction, so a dispatcher killed at any instant leaves nothing half-done:
a ``claimed`` delivery whose lease ran out goes back to ``queued``; a ``sending`` one
becomes ``in_doubt`` and is never resent blindly. Nothing here decides or sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import batched
from db.engine import dialect_insert
from db.models import Lead, Message, ScoreChange, WebhookDelivery
from nurture.delivery import MessageStatus
from nurture.webhooks import DUE, DeliveryStatus, LeadFacts, PlannedDelivery

IN_DOUBT_REASON = (
    "outcome unknown: the request had started when its dispatcher stopped; not resent "
    "(check with the receiver, then `nurture messages retry --webhooks --status in_doubt`)"
)


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def lead_facts(*, session: Session, lead_ids: Sequence[int]) -> dict[int, LeadFacts]:
    """The leads as webhooks tell them (profile, stage, scores) with their latest score change's contributions."""
    lead = Lead.__table__.c  # type: ignore[attr-defined]
    change = ScoreChange.__table__.c  # type: ignore[attr-defined]
    found: dict[int, LeadFacts] = {}
    for ids in batched(sorted(set(lead_ids))):
        latest = (
            select(func.max(change.id).label("id")).where(change.lead_id.in_(ids)).group_by(change.lead_id).subquery()
        )
        breakdown = {
            int(row.lead_id): (dict(row.contributions or {}), row.at)
            for row in session.execute(
                select(change.lead_id, change.contributions, change.at).where(change.id.in_(select(latest.c.id)))
            )
        }
        for row in session.execute(select(Lead.__table__).where(lead.id.in_(ids))):  # type: ignore[attr-defined]
            contributions, at = breakdown.get(int(row.id), ({}, None))
            found[int(row.id)] = LeadFacts(
                id=int(row.id),
                email=row.email,
                first_name=row.first_name,
                last_name=row.last_name,
                company=row.company,
                job_title=row.job_title,
                company_size=row.company_size,
                country=row.country,
                timezone=row.timezone,
                attributes=dict(row.attributes or {}),
                stage=row.stage,
                score=float(row.score),
                fit_score=float(row.fit_score),
                engagement=float(row.engagement),
                breakdown={str(k): float(v) for k, v in contributions.items()},
                scored_at=at,
            )
    return found


@dataclass(frozen=True, slots=True)
class FailedMessage:
    id: int
    lead_id: int
    sequence: str
    step_id: str
    error: str | None


def failed_messages(*, session: Session, ids: Sequence[int]) -> list[FailedMessage]:
    """Those of these messages whose status is ``failed`` now (an outcome just recorded)."""
    m = Message.__table__.c  # type: ignore[attr-defined]
    found: list[FailedMessage] = []
    for chunk in batched(sorted(set(ids))):
        query = select(m.id, m.lead_id, m.sequence, m.step_id, m.last_error).where(
            m.id.in_(chunk), m.status == MessageStatus.failed
        )
        found.extend(
            FailedMessage(int(r.id), int(r.lead_id), r.sequence, r.step_id, r.last_error)
            for r in session.execute(query)
        )
    return found


def enqueue_deliveries(*, session: Session, planned: Sequence[PlannedDelivery], now: datetime) -> int:
    """Write the deliveries in the caller's transaction; one already written (same key) is not written twice.

    Returns how many were new.
    """
    if not planned:
        return 0
    table = WebhookDelivery.__table__  # type: ignore[attr-defined]
    rows = [
        {
            "lead_id": p.lead_id,
            "webhook": p.webhook,
            "url": p.url,
            "event": p.event.value,
            "delivery_id": p.delivery_id,
            "idempotency_key": p.idempotency_key,
            "payload": p.payload,
            "status": DeliveryStatus.queued.value,
            "attempts": 0,
            "due_at": p.due_at,
            "created_at": now,
            "updated_at": now,
        }
        for p in planned
    ]
    statement = (
        dialect_insert(session, table).on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(table.c.id)
    )
    return len(session.execute(statement, rows).all())


def release_expired_leases(*, session: Session, clock: datetime) -> tuple[int, int]:
    """Claims whose lease ran out go back to ``queued``; sends whose lease ran out become ``in_doubt``.

    Returns (claims released, sends now in doubt).
    """
    table = WebhookDelivery.__table__  # type: ignore[attr-defined]
    released = session.execute(
        table.update()
        .where(table.c.status == DeliveryStatus.claimed, table.c.lease_until < clock)
        .values(status=DeliveryStatus.queued, lease_until=None, claimed_by=None, updated_at=clock)
    )
    doubtful = session.execute(
        table.update()
        .where(
            table.c.status == DeliveryStatus.sending,
            or_(table.c.lease_until.is_(None), table.c.lease_until < clock),
        )
        .values(status=DeliveryStatus.in_doubt, lease_until=None, last_error=IN_DOUBT_REASON, updated_at=clock)
    )
    return _rowcount(released), _rowcount(doubtful)


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    id: int
    webhook: str
    url: str
    event: str
    delivery_id: str
    payload: dict[str, Any]
    attempts: int


def claim_due(
    *, session: Session, now: datetime, limit: int, owner: str, claimed_at: datetime, lease: timedelta
) -> list[ClaimedDelivery]:
    """Claim up to ``limit`` deliveries due by ``now`` (queued, or failed and due again) for ``owner``."""
    table = WebhookDelivery.__table__  # type: ignore[attr-defined]
    c = table.c
    query = (
        select(c.id)
        .where(c.status.in_([s.value for s in DUE]), c.due_at <= now)
        .order_by(c.due_at, c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = [int(i) for i in session.scalars(query)]
    if not ids:
        return []
    session.execute(
        table.update()
        .where(c.id.in_(ids))
        .values(status=DeliveryStatus.claimed, claimed_by=owner, lease_until=claimed_at + lease, updated_at=claimed_at)
    )
    rows = session.execute(
        select(c.id, c.webhook, c.url, c.event, c.delivery_id, c.payload, c.attempts)
        .where(c.id.in_(ids))
        .order_by(c.id)
    )
    return [
        ClaimedDelivery(int(r.id), r.webhook, r.url, r.event, r.delivery_id, dict(r.payload), int(r.attempts))
        for r in rows
    ]


def mark_sending(
    *, session: Session, ids: Sequence[int], owner: str, started_at: datetime, lease_until: datetime
) -> set[int]:
    """Mark the deliveries ``owner`` still holds as ``sending``, right before their requests leave; returns them."""
    table = WebhookDelivery.__table__  # type: ignore[attr-defined]
    statement = (
        table.update()
        .where(table.c.id.in_(list(ids)), table.c.status == DeliveryStatus.claimed, table.c.claimed_by == owner)
        .values(
            status=DeliveryStatus.sending, send_started_at=started_at, lease_until=lease_until, updated_at=started_at
        )
        .returning(table.c.id)
    )
    return {int(i) for i in session.scalars(statement)}


@dataclass(frozen=True, slots=True)
class DeliveryUpdate:
    id: int
    status: DeliveryStatus
    due_at: datetime
    attempts: int
    error: str | None = None
    response_status: int | None = None
    delivered_at: datetime | None = None


def record_outcomes(*, session: Session, owner: str, updates: Sequence[DeliveryUpdate], at: datetime) -> int:
    """Write the outcomes of deliveries ``owner`` holds (sending, or declared in doubt meanwhile): one executemany.

    The dispatcher that made the request knows better than a sweep that declared it in doubt.
    """
    if not updates:
        return 0
    table = WebhookDelivery.__table__  # type: ignore[attr-defined]
    statement = (
        table.update()
        .where(
            table.c.id == bindparam("did"),
            table.c.claimed_by == owner,
            # OR, not IN: an expanding IN cannot be part of an executemany.
            or_(
                *(
                    table.c.status == s
                    for s in (DeliveryStatus.claimed, DeliveryStatus.sending, DeliveryStatus.in_doubt)
                )
            ),
        )
        .values(
            status=bindparam("new_status"),
            due_at=bindparam("new_due_at"),
            attempts=bindparam("new_attempts"),
            last_error=bindparam("new_error"),
            response_status=bindparam("new_response"),
            delivered_at=bindparam("new_delivered_at"),
            lease_until=None,
            updated_at=at,
        )
    )
    rows = [
        {
            "did": u.id,
            "new_status": u.status.value,
            "new_due_at": u.due_at,
            "new_attempts": u.attempts,
            "new_error": (u.error or None) and u.error[:2000],
            "new_response": u.response_status,
            "new_delivered_at": u.delivered_at,
        }
        for u in updates
    ]
    return _rowcount(session.execute(statement, rows))


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: int
    delivery_id: str
    email: str
    webhook: str
    event: str
    status: str
    due_at: datetime
    attempts: int
    response_status: int | None
    last_error: str | None


def _selection(statuses: Sequence[DeliveryStatus], ids: Sequence[int]) -> list[Any]:
    where: list[Any] = [col(WebhookDelivery.status).in_([s.value for s in statuses])]
    if ids:
        where.append(col(WebhookDelivery.id).in_(list(ids)))
    return where


def list_deliveries(
    *, session: Session, statuses: Sequence[DeliveryStatus], ids: Sequence[int] = (), limit: int
) -> list[DeliveryRow]:
    """The selected deliveries, most recently due first."""
    query = (
        select(
            col(WebhookDelivery.id),
            col(WebhookDelivery.delivery_id),
            col(Lead.email),
            col(WebhookDelivery.webhook),
            col(WebhookDelivery.event),
            col(WebhookDelivery.status),
            col(WebhookDelivery.due_at),
            col(WebhookDelivery.attempts),
            col(WebhookDelivery.response_status),
            col(WebhookDelivery.last_error),
        )
        .join(Lead, col(Lead.id) == col(WebhookDelivery.lead_id))
        .where(*_selection(statuses, ids))
        .order_by(col(WebhookDelivery.due_at).desc(), col(WebhookDelivery.id).desc())
        .limit(limit)
    )
    return [DeliveryRow(*row) for row in session.execute(query)]


def count_by_status(*, session: Session, statuses: Sequence[DeliveryStatus]) -> dict[str, int]:
    query = (
        select(col(WebhookDelivery.status), func.count())
        .where(col(WebhookDelivery.status).in_([s.value for s in statuses]))
        .group_by(col(WebhookDelivery.status))
    )
    return {str(status): int(n) for status, n in session.execute(query)}


def retry_deliveries(
    *, session: Session, statuses: Sequence[DeliveryStatus], ids: Sequence[int] = (), now: datetime
) -> int:
    """Queue the selected deliveries again, due ``now``, with their attempts counted from zero; returns how many."""
    result = session.execute(
        update(WebhookDelivery)
        .where(*_selection(statuses, ids))
        .values(
            status=DeliveryStatus.queued,
            due_at=now,
            attempts=0,
            lease_until=None,
            claimed_by=None,
            send_started_at=None,
            last_error="queued again by an operator (`nurture messages retry --webhooks`)",
            updated_at=now,
        )
    )
    return _rowcount(result)
