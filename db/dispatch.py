"""Dispatch: claim due messages, apply the contact policy, render, send, record — crash-safe.

The message table is a transactional outbox, and every step of a dispatch is
one short transaction, so a dispatcher killed at any instant leaves nothing
half-done:

1. Leases that ran out are released: a ``claimed`` message (no request started)
   goes back to ``queued``; a ``sending`` one (its request may have left) becomes
   ``in_doubt`` and is never resent blindly.
2. A batch of due messages is ``claimed`` by this dispatcher under a lease
   (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so dispatchers never claim the same row).
3. Suppression and the contact policy are applied; what may go out is rendered.
4. Groups of at most ``concurrency`` messages are marked ``sending`` (only those
   this dispatcher still owns) right before their requests leave, and each
   group's outcomes are written as soon as they are known.

So a crash can leave in doubt at most one group: the requests actually in flight.
The guarantee and its window are in docs/delivery.md.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Engine, and_, bindparam, exists, func, or_, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import PROFILE_COLUMNS, batched
from db.engine import session_scope
from db.models import Enrollment, Lead, Message, Suppression
from nurture.contact import DueEmail, decide
from nurture.delivery import MAYBE_DELIVERED, UNFINISHED, MessageStatus, RetryPolicy, SendOutcome, backoff_seconds
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

# Long enough for the slowest group of sends (retries and 429 waits included).
LEASE = timedelta(minutes=10)
IN_DOUBT_REASON = (
    "outcome unknown: the request had started when its dispatcher stopped; "
    "not resent (SendGrid's events settle it, or `nurture messages retry`)"
)

Clock = Callable[[], datetime]


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


@dataclass(frozen=True, slots=True)
class MessageProblem:
    """A message this dispatch failed, suppressed or left in doubt, and why (for logs and artifacts)."""

    message_id: int
    lead_id: int
    template: str
    status: str
    reason: str


@dataclass
class DispatchResult:
    by_status: Counter[str] = field(default_factory=Counter)
    deferred: Counter[str] = field(default_factory=Counter)
    problems: list[MessageProblem] = field(default_factory=list)
    # Found at the start: claims of a stopped dispatcher put back, and its sends now in doubt.
    released: int = 0
    found_in_doubt: int = 0

    def add(self, other: DispatchResult) -> None:
        self.by_status.update(other.by_status)
        self.deferred.update(other.deferred)
        self.problems.extend(other.problems)
        self.released += other.released
        self.found_in_doubt += other.found_in_doubt

    @property
    def claimed(self) -> int:
        return sum(self.by_status.values())

    @property
    def failed(self) -> int:
        return self.by_status.get(MessageStatus.failed, 0)

    @property
    def in_doubt(self) -> int:
        """Messages whose outcome nobody knows: left by this dispatch or found from a stopped one."""
        return self.by_status.get(MessageStatus.in_doubt, 0) + self.found_in_doubt


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def release_expired_leases(*, session: Session, clock: datetime) -> tuple[int, int]:
    """Claims whose lease ran out go back to ``queued``; sends whose lease ran out become ``in_doubt``.

    Returns (claims released, sends now in doubt). A send is never put back in the
    queue: its request may have reached the provider.
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
    )
    return _rowcount(released), _rowcount(doubtful)


def claim_due_messages(
    *, session: Session, now: datetime, limit: int, owner: str, claimed_at: datetime, lease: timedelta
) -> list[int]:
    """Claim up to ``limit`` messages due by ``now`` for ``owner``, for ``lease`` from ``claimed_at``; returns ids."""
    query = (
        select(col(Message.id))
        .where(col(Message.status) == MessageStatus.queued, col(Message.due_at) <= now)
        .order_by(col(Message.due_at), col(Message.id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
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
    statement = (
        update(Message)
        .where(
            col(Message.id).in_(list(ids)),
            col(Message.status) == MessageStatus.claimed,
            col(Message.claimed_by) == owner,
        )
        .values(
            status=MessageStatus.sending, send_started_at=started_at, lease_until=lease_until, updated_at=started_at
        )
        .returning(col(Message.id))
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


def record_outcomes(*, session: Session, owner: str, updates: Sequence[MessageUpdate], at: datetime) -> int:
    """Write outcomes of messages ``owner`` holds (claimed, sending, or marked in doubt meanwhile).

    One executemany. The dispatcher that sent a message knows its outcome better
    than a sweep that declared it in doubt, so its answer wins; a claim another
    dispatcher took over is left alone.
    """
    if not updates:
        return 0
    table = Message.__table__  # type: ignore[attr-defined]
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
        }
        for u in updates
    ]
    return _rowcount(session.execute(statement, rows))


def _load_claimed(session: Session, ids: list[int]) -> list[Any]:
    profile = [getattr(Lead, c) for c in PROFILE_COLUMNS]
    rows: list[Any] = []
    for chunk in batched(ids):
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
            .where(col(Message.id).in_(chunk))
            .order_by(col(Message.id))
        )
        rows.extend(session.execute(query))
    return rows


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


@dataclass(frozen=True, slots=True)
class _Attempt:
    row: Any
    email: OutgoingEmail


def _render(
    row: Any, playbook: Playbook, renderer: EmailRenderer, sender: Sender, now: datetime
) -> OutgoingEmail | str:
    """The email for a claimed row, or the template error as text."""
    lead = {c: getattr(row, c) for c in PROFILE_COLUMNS} | {"stage": row.stage, "score": row.score}
    link = unsubscribe_url(sender.public_url, row.lead_id, email=row.email, now=now, secret=sender.secret_key)
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


def send_with_retries(
    email: OutgoingEmail, transport: EmailTransport, policy: RetryPolicy, rng: random.Random, *, attempts_before: int
) -> SendOutcome:
    """Try one email until it is accepted, rejected, in doubt, or out of tries for this dispatch."""
    tries = 0
    last: TransientDeliveryError | None = None
    for tries in range(1, policy.attempts_per_dispatch + 1):
        try:
            provider_id = transport.send(email)
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
            return SendOutcome(MessageStatus.failed, tries, error=str(exc))
        except AmbiguousDeliveryError as exc:
            return SendOutcome(MessageStatus.in_doubt, tries, error=f"outcome unknown, not resent: {exc}")
        return SendOutcome(MessageStatus.sent, tries, provider_message_id=provider_id)
    total = attempts_before + tries
    if total >= policy.max_attempts:
        return SendOutcome(MessageStatus.failed, tries, error=f"gave up after {total} attempts: {last}")
    return SendOutcome(MessageStatus.queued, tries, error=str(last))


def _problem(row: Any, status: str, reason: str) -> MessageProblem:
    return MessageProblem(message_id=row.id, lead_id=row.lead_id, template=row.template, status=status, reason=reason)


def _triage(
    rows: list[Any],
    recent_sends: dict[int, list[datetime]],
    suppressed: dict[str, str],
    *,
    playbook: Playbook,
    renderer: EmailRenderer,
    sender: Sender,
    now: datetime,
    result: DispatchResult,
) -> tuple[list[MessageUpdate], list[_Attempt]]:
    """Apply suppression and the contact policy and render: what to write now, and what to send."""
    priorities = {name: seq.priority for name, seq in playbook.sequences.items()}
    due = [
        DueEmail(row.id, row.lead_id, priorities.get(row.sequence, 100), row.due_at, row.timezone)
        for row in rows
        if not (row.suppressed or row.email in suppressed)
    ]
    waits = decide(due, policy=playbook.contact_policy, recent_sends=recent_sends, now=now)
    settled: list[MessageUpdate] = []
    attempts: list[_Attempt] = []
    for row in rows:
        reason = row.suppressed or suppressed.get(row.email)
        wait = waits.get(row.id)
        if reason:
            why = f"address suppressed: {reason}"
            settled.append(MessageUpdate(row.id, MessageStatus.suppressed, row.due_at, row.attempts, why))
            result.by_status[MessageStatus.suppressed] += 1
            result.problems.append(_problem(row, MessageStatus.suppressed, why))
        elif wait is not None:
            until, why = wait
            settled.append(MessageUpdate(row.id, MessageStatus.queued, until, row.attempts, f"waiting for {why}"))
            result.deferred[why] += 1
        else:
            email = _render(row, playbook, renderer, sender, now)
            if isinstance(email, str):
                settled.append(MessageUpdate(row.id, MessageStatus.failed, row.due_at, row.attempts, email))
                result.by_status[MessageStatus.failed] += 1
                result.problems.append(_problem(row, MessageStatus.failed, email))
            else:
                attempts.append(_Attempt(row, email))
    return settled, attempts


def _outcome_update(attempt: _Attempt, outcome: SendOutcome, now: datetime, policy: RetryPolicy) -> MessageUpdate:
    row = attempt.row
    due_at = now + policy.requeue_after if outcome.status == MessageStatus.queued else row.due_at
    return MessageUpdate(
        id=row.id,
        status=outcome.status,
        due_at=due_at,
        attempts=row.attempts + outcome.tries,
        last_error=outcome.error,
        provider_message_id=outcome.provider_message_id,
        sent_at=now if outcome.status == MessageStatus.sent else None,
        subject=attempt.email.subject,
    )


def _complete_enrollments(session: Session, message_ids: list[int], now: datetime) -> None:
    """An active enrollment with nothing left queued, claimed or sending is completed."""
    unfinished = exists().where(
        and_(col(Message.enrollment_id) == col(Enrollment.id), col(Message.status).in_(UNFINISHED))
    )
    for chunk in batched(message_ids):
        enrollment_ids = select(col(Message.enrollment_id)).where(col(Message.id).in_(chunk))
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
    clock: Clock,
    batch_size: int = 500,
    max_batches: int | None = None,
    policy: RetryPolicy | None = None,
    concurrency: int = 1,
    pace: Pacer | None = None,
    lease: timedelta = LEASE,
) -> DispatchResult:
    """Send every message due by ``now``, a claimed batch at a time, recording each group as it goes.

    ``now`` decides what is due (a replay may pass another time); ``clock`` is the
    real time, which leases are measured in.
    """
    policy = policy or RetryPolicy()
    owner = uuid.uuid4().hex
    rng = random.Random()  # noqa: S311  (jitter, not a secret)
    total = DispatchResult()
    with session_scope(engine) as session:
        total.released, total.found_in_doubt = release_expired_leases(session=session, clock=clock())
    cap = playbook.contact_policy.frequency_cap
    batches = 0
    group_size = max(concurrency, 1) if pace is None else max(min(concurrency, pace.max_batch), 1)
    with ThreadPoolExecutor(max_workers=max(concurrency, 1), thread_name_prefix="nurture-send") as pool:
        while max_batches is None or batches < max_batches:
            with session_scope(engine) as session:
                ids = claim_due_messages(
                    session=session, now=now, limit=batch_size, owner=owner, claimed_at=clock(), lease=lease
                )
                rows = _load_claimed(session, ids) if ids else []
                recent = _recent_sends(session, [r.lead_id for r in rows], now - cap.per) if cap and rows else {}
                suppressed = suppression_reasons(session=session, emails=[r.email for r in rows])
            if not ids:
                break
            result = DispatchResult()
            settled, attempts = _triage(
                rows,
                recent,
                suppressed,
                playbook=playbook,
                renderer=renderer,
                sender=sender,
                now=now,
                result=result,
            )
            with session_scope(engine) as session:
                record_outcomes(session=session, owner=owner, updates=settled, at=clock())
            for group in batched(attempts, group_size):
                if pace is not None:
                    pace(len(group))
                started = clock()
                with session_scope(engine) as session:
                    mine = mark_sending(
                        session=session,
                        ids=[a.row.id for a in group],
                        owner=owner,
                        started_at=started,
                        lease_until=started + lease,
                    )
                group = [a for a in group if a.row.id in mine]
                outcomes = list(
                    pool.map(
                        lambda a: send_with_retries(a.email, transport, policy, rng, attempts_before=a.row.attempts),
                        group,
                    )
                )
                updates = [_outcome_update(a, o, now, policy) for a, o in zip(group, outcomes, strict=True)]
                with session_scope(engine) as session:
                    record_outcomes(session=session, owner=owner, updates=updates, at=clock())
                for attempt, outcome in zip(group, outcomes, strict=True):
                    result.by_status[outcome.status] += 1
                    if outcome.status in (MessageStatus.failed, MessageStatus.in_doubt):
                        result.problems.append(_problem(attempt.row, outcome.status, outcome.error or ""))
            with session_scope(engine) as session:
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
    if total.released or total.found_in_doubt:
        logger.warning(
            "a stopped dispatcher left %d claimed messages (queued again) and %d sends in doubt (not resent)",
            total.released,
            total.found_in_doubt,
        )
    return total
