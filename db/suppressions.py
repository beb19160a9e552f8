"""The suppression list, applied: addresses nurture must never mail again.

Suppressions are found by the hash of the address, so one outlives ``nurture
forget``. Suppressing an address also stops the mail already planned for its
lead: active enrollments exit and queued messages are cancelled, in the
caller's transaction. Every function here is set-based (a few statements per
batch, whatever its size) and idempotent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import batched
from db.engine import dialect_insert
from db.models import Enrollment, Lead, Message, Suppression
from nurture.delivery import MessageStatus
from nurture.privacy import email_hash
from nurture.sequences import EnrollmentState
from nurture.suppression import AddressSuppression


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def lead_address(*, session: Session, lead_id: int) -> str | None:
    """The lead's stored address, which its unsubscribe links are signed for; None once it is erased."""
    return session.scalar(select(col(Lead.email)).where(col(Lead.id) == lead_id))


def stop_mailing(*, session: Session, lead_ids: Sequence[int], reason: str, now: datetime) -> int:
    """Exit the leads' active enrollments and cancel everything not yet sending for them.

    A claimed message is cancelled too: its dispatcher marks only messages still
    claimed as sending, so an unsubscribe that lands mid-batch still stops it.
    """
    cancelled = 0
    for ids in batched(sorted(set(lead_ids))):
        session.execute(
            update(Enrollment)
            .where(col(Enrollment.lead_id).in_(ids), col(Enrollment.state) == EnrollmentState.active)
            .values(
                state=EnrollmentState.exited, exit_reason=reason, ended_at=now, next_due_at=None, waiting_until=None
            )
        )
        cancelled += _rowcount(
            session.execute(
                update(Message)
                .where(
                    col(Message.lead_id).in_(ids),
                    col(Message.status).in_([MessageStatus.queued, MessageStatus.claimed]),
                )
                .values(status=MessageStatus.cancelled, last_error=reason, updated_at=now)
            )
        )
    return cancelled


def suppress(*, session: Session, entries: Sequence[tuple[str, str]], now: datetime, source: str) -> int:
    """Add (email, reason) suppressions; an address already suppressed keeps its first reason, except an
    unsubscribe made with a link, which a later suppression of another source replaces: the page's undo
    lifts only a link's unsubscribe, so a bounce or spam report after it must be what the row says."""
    rows: dict[str, dict[str, Any]] = {}
    for email, reason in entries:
        hashed = email_hash(email)
        rows.setdefault(hashed, {"email": email, "email_hash": hashed, "reason": reason, "at": now, "source": source})
    if not rows:
        return 0
    insert = dialect_insert(session, Suppression)
    if source == LINK_SOURCE:
        statement = insert.on_conflict_do_nothing(index_elements=["email_hash"])
    else:
        statement = insert.on_conflict_do_update(
            index_elements=["email_hash"],
            set_={"reason": insert.excluded.reason, "source": insert.excluded.source, "at": insert.excluded.at},
            where=col(Suppression.source) == LINK_SOURCE,
        )
    # Sorted by hash: concurrent writers take the unique index's locks in one order.
    ordered = [rows[h] for h in sorted(rows)]
    return len(list(session.execute(statement.returning(col(Suppression.id)), ordered)))


def apply_suppressions(
    *,
    session: Session,
    suppressions: Sequence[AddressSuppression],
    lead_ids: Mapping[str, int],
    now: datetime,
    source: str,
) -> int:
    """Suppress the addresses and stop the mail of their leads (``lead_ids`` by email); returns rows added."""
    if not suppressions:
        return 0
    added = suppress(session=session, entries=[(s.email, s.reason.value) for s in suppressions], now=now, source=source)
    for reason in sorted({s.reason for s in suppressions}):
        affected = [lead_ids[s.email] for s in suppressions if s.reason == reason and s.email in lead_ids]
        stop_mailing(
            session=session, lead_ids=affected, reason=f"address suppressed: {reason} event ({source})", now=now
        )
    return added


# The source of an unsubscribe made with one of nurture's links still in its time (nurture/api.py): the
# only suppression the page's undo lifts, and only for UNDO_WINDOW after it was made, so the undo serves
# whoever pressed the button by mistake, not whoever holds a forwarded email months later.
LINK_SOURCE = "link"
UNDO_WINDOW = timedelta(hours=1)


def resubscribe(*, session: Session, lead_id: int, now: datetime) -> bool:
    """Lift the lead's unsubscribe if a link made it within the last UNDO_WINDOW; False when there is none.

    Only that: a bounce, a spam report, SendGrid's own suppressions, a manual one or an
    unsubscribe with an expired link stay. What was cancelled when it was made stays cancelled.
    """
    email = lead_address(session=session, lead_id=lead_id)
    if email is None:
        return False
    removed = session.execute(
        delete(Suppression).where(
            col(Suppression.email_hash) == email_hash(email),
            col(Suppression.reason) == "unsubscribe",
            col(Suppression.source) == LINK_SOURCE,
            col(Suppression.at) >= now - UNDO_WINDOW,
        )
    )
    return _rowcount(removed) > 0


def has_active_enrollments(*, session: Session, lead_id: int) -> bool:
    """Whether the lead is in a sequence now (a series of emails it could stop without unsubscribing)."""
    found = session.scalar(
        select(col(Enrollment.id))
        .where(col(Enrollment.lead_id) == lead_id, col(Enrollment.state) == EnrollmentState.active)
        .limit(1)
    )
    return found is not None
