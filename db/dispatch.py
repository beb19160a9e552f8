"""The outbox's reads and writes: leases, claims, ``sending`` marks and outcomes — each a short transaction.

The message table is a transactional outbox, and the send loop
(``flows/sending.py``) uses these so that a dispatcher killed at any instant
leaves nothing half-done:

1. Leases that ran out are released: a ``claimed`` message (no request started)
   goes back to ``queued``; a ``sending`` one (its request may have left) becomes
   ``in_doubt`` and is never resent blindly.
2. A batch of due messages is ``claimed`` by one dispatcher under a lease
   (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so dispatchers never claim the same row).
3. Groups of messages are marked ``sending`` (only those the dispatcher still owns)
   right before their requests leave, and each group's outcomes are written as
   soon as they are known.

Nothing here decides what to send or calls a provider. The guarantee and its
window are in docs/delivery.md.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import PROFILE_COLUMNS, batched
from db.models import Lead, Message, Suppression
from nurture.delivery import MAYBE_DELIVERED, ClaimedMessage, MessageStatus
from nurture.privacy import email_hash

# Long enough for the slowest group of sends (retries and 429 waits included).
LEASE = timedelta(minutes=10)
IN_DOUBT_REASON = (
    "outcome unknown: the request had started when its dispatcher stopped; "
    "not resent (SendGrid's events settle it, or `nurture messages retry`)"
)


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def release_expired_leases(*, session: Session, clock: datetime) -> tuple[int, list[int]]:
    """Claims whose lease ran out go back to ``queued``; sends whose lease ran out become ``in_doubt``.

    Returns (claims released, ids of the sends now in doubt). A send is never put back
    in the queue: its request may have reached the provider.
    """
    released = session.execute(
        update(Message)
        .where(col(Message.status) == MessageStatus.claimed, col(Message.lease_until) < clock)
        .values(status=MessageStatus.queued, lease_until=None, claimed_by=None, updated_at=clock)
    )
    doubtful = session.execute(
        update(Message)
        .where(
            col(Message.status) == MessageStatus.sending,
            or_(col(Message.lease_until).is_(None), col(Message.lease_until) < clock),
        )
        .values(status=MessageStatus.in_doubt, lease_until=None, last_error=IN_DOUBT_REASON, updated_at=clock)
        .returning(col(Message.id))
    )
    return _rowcount(released), [int(i) for i in doubtful.scalars() if i is not None]


def claim_due_messages(
    *,
    session: Session,
    now: datetime,
    limit: int,
    owner: str,
    claimed_at: datetime,
    lease: timedelta,
    paused: Iterable[str] = (),
) -> list[int]:
    """Claim up to ``limit`` messages due by ``now`` for ``owner``, for ``lease`` from ``claimed_at``; returns ids.

    Messages of ``paused`` sequences stay queued.
    """
    query = (
        select(col(Message.id))
        .where(col(Message.status) == MessageStatus.queued, col(Message.due_at) <= now)
        .order_by(col(Message.due_at), col(Message.id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if paused := sorted(paused):
        query = query.where(col(Message.sequence).not_in(paused))
    ids = [int(i) for i in session.scalars(query) if i is not None]
    for chunk in batched(ids):
        session.execute(
            update(Message)
            .where(col(Message.id).in_(chunk))
            .values(
                status=MessageStatus.claimed, claimed_by=owner, lease_until=claimed_at + lease, updated_at=claimed_at
            )
        )
    return ids


def mark_sending(
    *, session: Session, ids: Sequence[int], owner: str, started_at: datetime, lease_until: datetime
) -> set[int]:
    """Mark the messages ``owner`` still holds as ``sending``, right before their requests leave.

    Returns the ids it marked: a claim whose lease ran out may have been taken by
    another dispatcher meanwhile, and then it is not this one's to send.
    """
    table = Message.__table__  # type: ignore[attr-defined]
    # On the table, not the entity: one Core statement per wave, without the ORM's bulk-update bookkeeping.
    statement = (
        table.update()
        .where(table.c.id.in_(list(ids)), table.c.status == MessageStatus.claimed, table.c.claimed_by == owner)
        .values(
            status=MessageStatus.sending, send_started_at=started_at, lease_until=lease_until, updated_at=started_at
        )
        .returning(table.c.id)
    )
    return {int(i) for i in session.scalars(statement) if i is not None}


@dataclass(frozen=True, slots=True)
class MessageUpdate:
    """What to write for one message this dispatcher holds."""

    id: int
    status: MessageStatus
    due_at: datetime
    attempts: int
    last_error: str | None = None
    provider_message_id: str | None = None
    sent_at: datetime | None = None
    subject: str | None = None
    # What was sent, when the step's content is taken from the playbook at send time.
    template: str | None = None
    subject_template: str | None = None
    playbook_version: str | None = None
    # The split test's variant of that content (written whenever ``template`` is, None included).
    variant: str | None = None


def record_outcomes(*, session: Session, owner: str, updates: Sequence[MessageUpdate], at: datetime) -> int:
    """Write outcomes of messages ``owner`` holds (claimed, sending, or marked in doubt meanwhile).

    One executemany. The dispatcher that sent a message knows its outcome better
    than a sweep that declared it in doubt, so its answer wins; a claim another
    dispatcher took over is left alone.
    """
    if not updates:
        return 0
    table = Message.__table__  # type: ignore[attr-defined]
    new_template = bindparam("new_template", type_=String())
    statement = (
        table.update()
        .where(
            table.c.id == bindparam("mid"),
            table.c.claimed_by == owner,
            or_(
                table.c.status == MessageStatus.claimed,
                table.c.status == MessageStatus.sending,
                table.c.status == MessageStatus.in_doubt,
            ),
        )
        .values(
            status=bindparam("new_status"),
            due_at=bindparam("new_due_at"),
            attempts=bindparam("new_attempts"),
            last_error=bindparam("new_error"),
            provider_message_id=func.coalesce(bindparam("pid"), table.c.provider_message_id),
            sent_at=bindparam("new_sent_at"),
            subject=func.coalesce(bindparam("new_subject"), table.c.subject),
            template=func.coalesce(new_template, table.c.template),
            variant=case((new_template.is_not(None), bindparam("new_variant", type_=String())), else_=table.c.variant),
            subject_template=func.coalesce(bindparam("new_subject_template"), table.c.subject_template),
            playbook_version=func.coalesce(bindparam("new_version"), table.c.playbook_version),
            lease_until=None,
            updated_at=at,
        )
    )
    rows = [
        {
            "mid": u.id,
            "new_status": u.status.value,
            "new_due_at": u.due_at,
            "new_attempts": u.attempts,
            "new_error": (u.last_error or None) and u.last_error[:2000],
            "pid": u.provider_message_id,
            "new_sent_at": u.sent_at,
            "new_subject": u.subject,
            "new_template": u.template,
            "new_variant": u.variant,
            "new_subject_template": u.subject_template,
            "new_version": u.playbook_version,
        }
        for u in updates
    ]
    return _rowcount(session.execute(statement, rows))


@dataclass(frozen=True, slots=True)
class LoadedMessage:
    """A claimed message with what its email needs: the lead's fields, its key, its step's position."""

    message: ClaimedMessage
    idempotency_key: str
    position: int
    lead: dict[str, Any]


def load_claimed(*, session: Session, ids: Sequence[int]) -> list[LoadedMessage]:
    """The claimed messages with their leads, and whether each address is suppressed."""
    # Table columns, not entity attributes: a Core select, read without the ORM's row machinery.
    m, lead = Message.__table__.c, Lead.__table__.c  # type: ignore[attr-defined]
    profile = [lead[c] for c in PROFILE_COLUMNS]
    rows: list[Any] = []
    for chunk in batched(list(ids)):
        query = (
            select(
                m.id,
                m.lead_id,
                m.sequence,
                m.step_id,
                m.step,
                m.variant,
                m.idempotency_key,
                m.attempts,
                m.due_at,
                lead.stage,
                lead.score,
                lead.suppressed,
                *profile,
            )
            .join_from(Message.__table__, Lead.__table__, lead.id == m.lead_id)  # type: ignore[attr-defined]
            .where(m.id.in_(chunk))
            .order_by(m.id)
        )
        rows.extend(session.execute(query))
    listed = suppression_reasons(session=session, emails=[r.email for r in rows])
    return [
        LoadedMessage(
            message=ClaimedMessage(
                id=r.id,
                lead_id=r.lead_id,
                sequence=r.sequence,
                step_id=r.step_id,
                attempts=r.attempts,
                due_at=r.due_at,
                email=r.email,
                timezone=r.timezone,
                suppressed=r.suppressed or listed.get(r.email),
                variant=r.variant,
            ),
            idempotency_key=r.idempotency_key,
            position=r.step,
            lead=email_fields(r),
        )
        for r in rows
    ]


def email_fields(row: Any) -> dict[str, Any]:
    """What templates see as ``lead``, from a row with the lead's columns (docs/templates.md)."""
    return {c: getattr(row, c) for c in PROFILE_COLUMNS} | {"stage": row.stage, "score": row.score}


@dataclass(frozen=True, slots=True)
class LeadForEmail:
    """A lead as its emails need it: its id (unsubscribe links), address and template fields, and why its
    address must not be mailed (None: it may be)."""

    lead_id: int
    email: str
    fields: dict[str, Any]
    suppressed: str | None = None


def load_lead_for_email(*, session: Session, email: str) -> LeadForEmail | None:
    """The lead with this (canonical) address, read as the dispatcher reads it; None if there is none."""
    lead = Lead.__table__.c  # type: ignore[attr-defined]
    query = select(lead.id, lead.stage, lead.score, lead.suppressed, *(lead[c] for c in PROFILE_COLUMNS))
    row = session.execute(query.where(lead.email == email)).first()
    if row is None:
        return None
    listed = suppression_reasons(session=session, emails=[row.email]).get(row.email)
    return LeadForEmail(lead_id=row.id, email=row.email, fields=email_fields(row), suppressed=row.suppressed or listed)


def suppression_reasons(*, session: Session, emails: Sequence[str]) -> dict[str, str]:
    """Why each of ``emails`` must not be mailed, for those on the suppression list (by hash)."""
    by_hash = {email_hash(e): e for e in emails}
    reasons: dict[str, str] = {}
    for hashes in batched(sorted(by_hash)):
        query = select(col(Suppression.email_hash), col(Suppression.reason)).where(
            col(Suppression.email_hash).in_(hashes)
        )
        for hashed, reason in session.execute(query):
            reasons[by_hash[hashed]] = reason
    return reasons


def recent_sends(*, session: Session, lead_ids: Sequence[int], since: datetime) -> dict[int, list[datetime]]:
    """When each lead was last mailed within the frequency cap's period (sends in doubt count too)."""
    sends: dict[int, list[datetime]] = defaultdict(list)
    when = func.coalesce(col(Message.sent_at), col(Message.send_started_at))
    for ids in batched(sorted(set(lead_ids))):
        query = select(col(Message.lead_id), when).where(
            col(Message.lead_id).in_(ids), col(Message.status).in_(MAYBE_DELIVERED), when > since
        )
        for lead_id, sent_at in session.execute(query):
            if sent_at is not None:
                sends[int(lead_id)].append(sent_at)
    return sends
