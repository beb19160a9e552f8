"""Dispatch: claim due messages in batches, apply the contact policy, render, send, record.

The message table is a transactional outbox. A batch is claimed in its own
short transaction (status ``sending`` with a lease; ``FOR UPDATE SKIP LOCKED``
on PostgreSQL so dispatchers never claim the same row), sent with no
transaction open, and its outcomes written in one more. Suppression and the
contact policy are checked when a message is claimed, not only when queued.
The guarantee and its one remaining window are in docs/delivery.md.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Engine, and_, exists, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import PROFILE_COLUMNS, batched
from db.engine import session_scope
from db.models import Enrollment, Lead, Message, Suppression
from nurture.contact import DueEmail, decide
from nurture.delivery import RetryPolicy, backoff_seconds
from nurture.errors import (
    AmbiguousDeliveryError,
    PermanentDeliveryError,
    TemplateError,
    TransientDeliveryError,
)
from nurture.playbook import Playbook
from nurture.privacy import email_hash
from nurture.rendering import EmailRenderer, email_context
from nurture.transports.base import EmailTransport, OutgoingEmail
from nurture.unsubscribe import unsubscribe_url

logger = logging.getLogger(__name__)

LEASE = timedelta(minutes=10)
# An ambiguous send that no `processed` event settled within this time is failed, never resent.
SETTLE_AFTER = timedelta(hours=6)


class Pacer(Protocol):
    """Blocks until ``count`` more sends fit a shared send rate."""

    max_batch: int

    def __call__(self, count: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Sender:
    """Who the emails come from and where their links point."""

    from_email: str
    postal_address: str
    public_url: str
    secret_key: str
    unsubscribe_mailto: str | None = None
    asm_group_id: int | None = None


@dataclass
class DispatchResult:
    by_status: Counter[str] = field(default_factory=Counter)
    deferred: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    settled: int = 0

    def add(self, other: DispatchResult) -> None:
        self.by_status.update(other.by_status)
        self.deferred.update(other.deferred)
        self.failures.extend(other.failures)
        self.settled += other.settled

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
            .values(status="sending", lease_until=now + LEASE, updated_at=now)
        )
    return ids


def settle_stale_sends(*, session: Session, now: datetime, settle_after: timedelta = SETTLE_AFTER) -> int:
    """The reconciliation rule: a send nobody confirmed within ``settle_after`` is failed, not resent.

    Covers timeouts after the request left and dispatchers that died mid-batch.
    SendGrid's ``processed`` event (through the webhook) marks such messages sent
    long before this; a resend could mail the lead twice, so there is none.
    """
    result = session.execute(
        update(Message)
        .where(col(Message.status) == "sending", col(Message.updated_at) < now - settle_after)
        .values(
            status="failed",
            lease_until=None,
            updated_at=now,
            last_error=f"outcome unknown: not confirmed within {settle_after}; not resent to avoid a duplicate",
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


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
            col(Message.due_at),
            col(Lead.stage),
            col(Lead.score),
            col(Lead.suppressed),
            *profile,
        )
        .join(Lead, col(Lead.id) == col(Message.lead_id))
        .where(col(Message.id).in_(ids))
        .order_by(col(Message.id))
    )
    return list(session.execute(query))


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


def _recent_sends(session: Session, lead_ids: Sequence[int], since: datetime) -> dict[int, list[datetime]]:
    sends: dict[int, list[datetime]] = defaultdict(list)
    for ids in batched(sorted(set(lead_ids))):
        query = select(col(Message.lead_id), col(Message.sent_at)).where(
            col(Message.lead_id).in_(ids), col(Message.status) == "sent", col(Message.sent_at) > since
        )
        for lead_id, sent_at in session.execute(query):
            if sent_at is not None:
                sends[int(lead_id)].append(sent_at)
    return sends


@dataclass(frozen=True, slots=True)
class _Attempt:
    row: Any
    email: OutgoingEmail


def _render(
    row: Any, playbook: Playbook, renderer: EmailRenderer, sender: Sender, now: datetime
) -> OutgoingEmail | str:
    """The email for a claimed row, or the template error as text."""
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
        return f"template error: {exc}"
    return OutgoingEmail(
        message_id=row.id,
        idempotency_key=row.idempotency_key,
        to_email=row.email,
        from_email=sender.from_email,
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        unsubscribe_url=link,
        unsubscribe_mailto=sender.unsubscribe_mailto,
        asm_group_id=sender.asm_group_id,
        category=row.sequence,
        date=now,
        custom_args={"nurture_message_id": str(row.id)},
    )


def _send_with_retries(
    attempt: _Attempt,
    transport: EmailTransport,
    policy: RetryPolicy,
    now: datetime,
    rng: random.Random,
) -> dict[str, Any]:
    """Try one email until it is accepted, rejected, ambiguous, or out of tries for this dispatch."""
    tries = 0
    last: TransientDeliveryError | None = None
    for tries in range(1, policy.attempts_per_dispatch + 1):
        try:
            provider_id = transport.send(attempt.email)
        except TransientDeliveryError as exc:
            last = exc
            wait = exc.retry_after_seconds
            if wait is None:
                wait = backoff_seconds(policy, tries - 1, rng)
            if wait > policy.max_rate_limit_wait_seconds or tries == policy.attempts_per_dispatch:
                break
            time.sleep(wait)
            continue
        except PermanentDeliveryError as exc:
            return {"status": "failed", "last_error": str(exc), "tries": tries}
        except AmbiguousDeliveryError as exc:
            # Left `sending`; settled by the provider's `processed` event or by settle_stale_sends.
            return {"status": "sending", "last_error": f"outcome unknown, not retried: {exc}", "tries": tries}
        return {
            "status": "sent",
            "sent_at": now,
            "provider_message_id": provider_id,
            "last_error": None,
            "tries": tries,
        }
    total = attempt.row.attempts + tries
    if total >= policy.max_attempts:
        return {"status": "failed", "last_error": f"gave up after {total} attempts: {last}", "tries": tries}
    return {"status": "queued", "due_at": now + policy.requeue_after, "last_error": str(last), "tries": tries}


def dispatch_batch(
    rows: list[Any],
    recent_sends: dict[int, list[datetime]],
    suppressed: dict[str, str],
    *,
    playbook: Playbook,
    renderer: EmailRenderer,
    transport: EmailTransport,
    sender: Sender,
    now: datetime,
    policy: RetryPolicy,
    concurrency: int = 1,
    pace: Pacer | None = None,
) -> tuple[list[dict[str, Any]], DispatchResult]:
    """Decide, render and send a claimed batch; returns the row updates to write and the tally."""
    result = DispatchResult()
    updates: list[dict[str, Any]] = []
    priorities = {name: seq.priority for name, seq in playbook.sequences.items()}
    due = [
        DueEmail(row.id, row.lead_id, priorities.get(row.sequence, 100), row.due_at, row.timezone)
        for row in rows
        if not (row.suppressed or row.email in suppressed)
    ]
    waits = decide(due, policy=playbook.contact_policy, recent_sends=recent_sends, now=now)
    attempts: list[_Attempt] = []
    for row in rows:
        base: dict[str, Any] = {"id": row.id, "lease_until": None, "updated_at": now}
        reason = row.suppressed or suppressed.get(row.email)
        wait = waits.get(row.id)
        if reason:
            updates.append(base | {"status": "suppressed", "last_error": f"address suppressed: {reason}"})
        elif wait is not None:
            until, why = wait
            updates.append(base | {"status": "queued", "due_at": until, "last_error": f"waiting for {why}"})
            result.deferred[why] += 1
            continue
        else:
            email = _render(row, playbook, renderer, sender, now)
            if isinstance(email, str):
                updates.append(base | {"status": "failed", "last_error": email})
            else:
                attempts.append(_Attempt(row, email))
                continue
        result.by_status[updates[-1]["status"]] += 1
        result.failures.append(
            {
                "message_id": row.id,
                "lead_id": row.lead_id,
                "template": row.template,
                "status": updates[-1]["status"],
                "reason": updates[-1]["last_error"],
            }
        )

    random_source = random.Random()  # noqa: S311  (jitter, not a secret)
    # Groups small enough that a paced group goes out as it is admitted, not in a burst later.
    step = max(concurrency * 8, 1) if pace is None else max(min(concurrency * 8, pace.max_batch), 1)
    with ThreadPoolExecutor(max_workers=max(concurrency, 1), thread_name_prefix="nurture-send") as pool:
        for chunk in batched(attempts, step):
            if pace is not None:
                pace(len(chunk))
            outcomes = pool.map(lambda a: _send_with_retries(a, transport, policy, now, random_source), chunk)
            for attempt, outcome in zip(chunk, outcomes, strict=True):
                tries = outcome.pop("tries")
                update_ = {
                    "id": attempt.row.id,
                    "lease_until": None,
                    "updated_at": now,
                    "attempts": attempt.row.attempts + tries,
                    "subject": attempt.email.subject,
                } | outcome
                updates.append(update_)
                result.by_status[outcome["status"]] += 1
                if outcome["status"] in {"failed", "sending"}:
                    result.failures.append(
                        {
                            "message_id": attempt.row.id,
                            "lead_id": attempt.row.lead_id,
                            "template": attempt.row.template,
                            "status": outcome["status"],
                            "reason": outcome["last_error"],
                        }
                    )
    return updates, result


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


def _record(session: Session, updates: list[dict[str, Any]]) -> None:
    # executemany needs the same columns in every row: group the updates by their keys.
    by_shape: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for item in updates:
        by_shape.setdefault(tuple(sorted(item)), []).append(item)
    for group in by_shape.values():
        session.execute(update(Message), group)


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
    policy: RetryPolicy | None = None,
    concurrency: int = 1,
    pace: Pacer | None = None,
) -> DispatchResult:
    """Send every message due by ``now``, a claimed batch at a time."""
    policy = policy or RetryPolicy()
    total = DispatchResult()
    with session_scope(engine) as session:
        total.settled = settle_stale_sends(session=session, now=now)
    batches = 0
    cap = playbook.contact_policy.frequency_cap
    while max_batches is None or batches < max_batches:
        with session_scope(engine) as session:
            ids = claim_due_messages(session=session, now=now, limit=batch_size)
            rows = _load_claimed(session, ids) if ids else []
            recent = _recent_sends(session, [r.lead_id for r in rows], now - cap.per) if cap and rows else {}
            suppressed = suppression_reasons(session=session, emails=[r.email for r in rows])
        if not ids:
            break
        updates, result = dispatch_batch(
            rows,
            recent,
            suppressed,
            playbook=playbook,
            renderer=renderer,
            transport=transport,
            sender=sender,
            now=now,
            policy=policy,
            concurrency=concurrency,
            pace=pace,
        )
        with session_scope(engine) as session:
            _record(session, updates)
            _complete_enrollments(session, ids, now)
        total.add(result)
        batches += 1
        logger.info(
            "dispatch batch %d: %d claimed, %s; %d waiting for the contact policy",
            batches,
            len(ids),
            dict(result.by_status) or "nothing sent",
            sum(result.deferred.values()),
        )
    return total
