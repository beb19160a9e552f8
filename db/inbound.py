"""What arrives over HTTP, applied to the database: provider events, unsubscribes, erasure.

Everything here is idempotent, so SendGrid's retries and duplicates change
nothing: events are unique per (source, external id), suppressions per address
hash, and message statuses only move forward. Scoring stays in the cycle: these
functions append events and suppressions and stop mail at once, nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, delete, or_, select
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import batched
from db.imports import dialect_insert
from db.models import Enrollment, Event, Lead, Message, ScoreChange, StageTransition, Suppression, WebhookDelivery
from db.suppressions import apply_suppressions

# Re-exported: they moved to db.suppressions, callers still import them from here.
from db.suppressions import stop_mailing as stop_mailing
from db.suppressions import suppress as suppress
from nurture.delivery import MessageStatus
from nurture.inbound import ProviderEvent, provider_suppressions
from nurture.privacy import email_hash


@dataclass
class WebhookResult:
    received: int = 0
    events_stored: int = 0
    duplicates: int = 0
    suppressions_added: int = 0
    messages_updated: int = 0
    ignored: int = 0
    problems: list[str] = field(default_factory=list)


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _lead_ids(session: Session, emails: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in batched(sorted(set(emails))):
        query = select(col(Lead.email), col(Lead.id)).where(col(Lead.email).in_(chunk))
        found.update({email: int(lead_id) for email, lead_id in session.execute(query) if lead_id is not None})
    return found


def ingest_provider_events(*, session: Session, events: Sequence[ProviderEvent], now: datetime) -> WebhookResult:
    """Apply a batch of SendGrid events: scoring events, suppressions, message outcomes."""
    result = WebhookResult(received=len(events))
    leads = _lead_ids(session, [e.email for e in events if e.email])

    scored = [e for e in events if e.scoring_kind and e.email in leads]
    if scored:
        rows = [
            {
                "lead_id": leads[e.email],
                "kind": e.scoring_kind,
                "occurred_at": e.occurred_at,
                "source": "sendgrid",
                "external_id": e.external_id,
                "properties": e.properties,
                "applied": False,
                "received_at": now,
                "message_id": e.message_id,
            }
            for e in scored
            if e.email is not None
        ]
        # In lead order, the order the cycle locks leads in: the foreign-key checks of this
        # insert then queue behind a cycle instead of deadlocking with it.
        rows.sort(key=lambda row: (row["lead_id"], row["external_id"]))
        statement = dialect_insert(session, Event).on_conflict_do_nothing(index_elements=["source", "external_id"])
        result.events_stored = len(list(session.execute(statement.returning(col(Event.id)), rows)))
        result.duplicates = len(rows) - result.events_stored

    result.suppressions_added = apply_suppressions(
        session=session, suppressions=provider_suppressions(events), lead_ids=leads, now=now, source="sendgrid"
    )
    resubscribed = [email_hash(e.email) for e in events if e.event_type == "group_resubscribe" and e.email]
    for hashes in batched(resubscribed):
        session.execute(
            delete(Suppression).where(
                col(Suppression.email_hash).in_(hashes), col(Suppression.reason) == "group_unsubscribe"
            )
        )

    result.messages_updated = _settle_messages(session, events, now)
    return result


def _settle_messages(session: Session, events: Sequence[ProviderEvent], now: datetime) -> int:
    """processed/delivered confirm a send left in doubt; delivered dates it; bounce/dropped fail it.

    One executemany per kind of change: a batch of 1,000 events is two round trips, not 1,000.
    """
    table = Message.__table__  # type: ignore[attr-defined]
    updated = 0
    confirmed = [
        {"mid": e.message_id, "at": e.occurred_at, "pid": e.provider_message_id}
        for e in events
        if e.event_type in {"processed", "delivered"} and e.message_id is not None
    ]
    if confirmed:
        statement = (
            table.update()
            .where(
                table.c.id == bindparam("mid"),
                or_(table.c.status == MessageStatus.sending, table.c.status == MessageStatus.in_doubt),
            )
            .values(
                status="sent",
                sent_at=bindparam("at"),
                provider_message_id=bindparam("pid"),
                lease_until=None,
                updated_at=now,
                last_error="confirmed by SendGrid's events after its send was left in doubt",
            )
        )
        updated += _rowcount(session.execute(statement, confirmed))
    delivered = [
        {"mid": e.message_id, "at": e.occurred_at}
        for e in events
        if e.event_type == "delivered" and e.message_id is not None
    ]
    if delivered:
        # The first delivery counts (SendGrid may report one again); reports count delivered emails by it.
        statement = (
            table.update()
            .where(table.c.id == bindparam("mid"), table.c.delivered_at.is_(None))
            .values(delivered_at=bindparam("at"))
        )
        session.execute(statement, delivered)
    failed = [
        {"mid": e.message_id, "why": f"{e.event_type}: {e.reason or 'no reason given'}"}
        for e in events
        if e.event_type in {"bounce", "dropped"} and e.message_id is not None
    ]
    if failed:
        statement = (
            table.update()
            # No IN (...) here: expanding parameters cannot be used with executemany.
            .where(
                table.c.id == bindparam("mid"),
                or_(
                    table.c.status == MessageStatus.sending,
                    table.c.status == MessageStatus.in_doubt,
                    table.c.status == MessageStatus.sent,
                ),
            )
            .values(status="failed", last_error=bindparam("why"), lease_until=None, updated_at=now)
        )
        updated += _rowcount(session.execute(statement, failed))
    return updated


def unsubscribe_lead(*, session: Session, lead_id: int, now: datetime, source: str = "link") -> str | None:
    """Suppress the lead's address and stop its mail at once; returns the address, or None if unknown."""
    email = session.scalar(select(col(Lead.email)).where(col(Lead.id) == lead_id))
    if email is None:
        return None
    suppress(session=session, entries=[(email, "unsubscribe")], now=now, source=source)
    stop_mailing(session=session, lead_ids=[lead_id], reason="unsubscribed", now=now)
    return email


@dataclass(frozen=True)
class ForgetResult:
    lead_found: bool
    emails_removed_from_outbox: int


def forget_lead(*, session: Session, email: str, now: datetime, outbox: Path | None = None) -> ForgetResult:
    """Erase a person: the lead and all its rows go, only a hashed suppression stays."""
    lead_id = session.scalar(select(col(Lead.id)).where(col(Lead.email) == email))
    if lead_id is not None:
        # Children first: SQLite and PostgreSQL would cascade, but explicit deletes do not depend on it.
        for model in (WebhookDelivery, Message, Enrollment, StageTransition, ScoreChange, Event):
            session.execute(delete(model).where(col(model.lead_id) == lead_id))
        session.execute(delete(Lead).where(col(Lead.id) == lead_id))
    hashed = email_hash(email)
    session.execute(delete(Suppression).where(col(Suppression.email_hash) == hashed))
    session.execute(
        dialect_insert(session, Suppression),
        [{"email": None, "email_hash": hashed, "reason": "forgotten", "at": now, "source": "forget"}],
    )
    removed = 0
    if lead_id is not None and outbox is not None and outbox.is_dir():
        for eml in outbox.glob(f"*_lead-{lead_id}_*.eml"):
            eml.unlink()
            removed += 1
    return ForgetResult(lead_found=lead_id is not None, emails_removed_from_outbox=removed)
