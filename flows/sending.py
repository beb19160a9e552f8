"""The send loop: claim due messages, judge them (the core), render, send through the transport, record.

Every database step is one short transaction of ``db/dispatch.py``, so a
dispatcher killed at any instant leaves nothing half-done (docs/delivery.md):
claims go back to the queue, a send whose request may have left becomes
``in_doubt`` and is never resent blindly. A crash can leave in doubt at most
one group: the requests actually in flight.

When a message settles (sent, failed, suppressed, cancelled, in doubt), its
enrollment moves on in the same transaction: the next step's due time is set,
counted from now (``flows/advancing.py``).

No Prefect here: the dispatch task calls :func:`dispatch_due`, and so do tests.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.cycle import paused_sequences
from db.dispatch import (
    LEASE,
    LoadedMessage,
    MessageUpdate,
    claim_due_messages,
    load_claimed,
    mark_sending,
    recent_sends,
    record_outcomes,
    release_expired_leases,
)
from db.engine import session_scope
from flows.advancing import settle_steps
from flows.inflight import InFlight
from flows.webhooks import announce_failures
from nurture.delivery import MessageStatus, RetryPolicy, SendOutcome, backoff_seconds
from nurture.dispatching import Triage, Verdict, triage
from nurture.errors import AmbiguousDeliveryError, PermanentDeliveryError, TemplateError, TransientDeliveryError
from nurture.playbook import Playbook
from nurture.rendering import EmailRenderer, email_context
from nurture.settings import Settings
from nurture.transports.base import EmailTransport, OutgoingEmail
from nurture.unsubscribe import unsubscribe_url

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
T = TypeVar("T")


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

    @classmethod
    def from_settings(cls, settings: Settings) -> Sender:
        return cls(
            from_email=settings.nurture_from_email,
            postal_address=settings.nurture_postal_address,
            public_url=settings.nurture_public_url,
            secret_key=settings.nurture_secret_key.get_secret_value(),
            unsubscribe_mailto=settings.nurture_unsubscribe_mailto,
            asm_group_id=settings.sendgrid_asm_group_id,
        )

    def unsubscribe_link(self, lead_id: int, *, email: str, now: datetime) -> str:
        """The signed one-click unsubscribe link of a lead's email."""
        return unsubscribe_url(self.public_url, lead_id, email=email, now=now, secret=self.secret_key)


@dataclass(frozen=True, slots=True)
class MessageProblem:
    """A message this dispatch failed, suppressed, cancelled or left in doubt, and why (for logs and artifacts)."""

    message_id: int
    lead_id: int
    step_id: str
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


@dataclass(frozen=True, slots=True)
class _Attempt:
    loaded: LoadedMessage
    verdict: Triage
    email: OutgoingEmail


def _render(
    loaded: LoadedMessage, verdict: Triage, playbook: Playbook, renderer: EmailRenderer, sender: Sender, now: datetime
) -> OutgoingEmail | str:
    """The email for a message judged ``send``, or the template error as text."""
    message = loaded.message
    try:
        return compose_email(
            playbook=playbook,
            renderer=renderer,
            sender=sender,
            lead=loaded.lead,
            to_email=message.email,
            unsubscribe_link=sender.unsubscribe_link(message.lead_id, email=message.email, now=now),
            sequence=message.sequence,
            position=loaded.position,
            template=verdict.template,
            subject=verdict.subject,
            message_id=message.id,
            idempotency_key=loaded.idempotency_key,
            now=now,
            preheader=verdict.preheader,
        )
    except TemplateError as exc:
        return f"template error: {exc}"


def compose_email(
    *,
    playbook: Playbook,
    renderer: EmailRenderer,
    sender: Sender,
    lead: Mapping[str, Any],
    to_email: str,
    unsubscribe_link: str,
    sequence: str,
    position: int,
    template: str,
    subject: str,
    message_id: int,
    idempotency_key: str,
    now: datetime,
    preheader: str = "",
) -> OutgoingEmail:
    """One step's email for a lead, as it leaves nurture: rendered parts, sender, headers, custom args.

    The dispatcher and `nurture preview` both build emails here, so a preview is the email
    the lead gets. Raises ``TemplateError`` when the template fails for this lead.
    """
    rendered = renderer.render(
        template=template,
        subject=subject,
        preheader=preheader,
        context=email_context(
            playbook,
            lead=lead,
            unsubscribe_url=unsubscribe_link,
            postal_address=sender.postal_address,
            sequence=sequence,
            step=position,
        ),
    )
    return OutgoingEmail(
        message_id=message_id,
        idempotency_key=idempotency_key,
        to_email=to_email,
        from_email=sender.from_email,
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        unsubscribe_url=unsubscribe_link,
        unsubscribe_mailto=sender.unsubscribe_mailto,
        asm_group_id=sender.asm_group_id,
        category=sequence,
        date=now,
        custom_args={"nurture_message_id": str(message_id)},
        preheader=rendered.preheader,
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
            asked = exc.retry_after_seconds
            if (asked or 0.0) > policy.max_rate_limit_wait_seconds or tries == policy.attempts_per_dispatch:
                break
            # Never before the time SendGrid named; jitter on top, so the sends it held back
            # (up to NURTURE_SEND_CONCURRENCY of them) do not all come back in the same instant.
            time.sleep((asked or 0.0) + backoff_seconds(policy, tries - 1, rng))
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


_SETTLED_AS = {
    Verdict.suppress: MessageStatus.suppressed,
    Verdict.cancel: MessageStatus.cancelled,
}


def _problem(loaded: LoadedMessage, status: str, reason: str) -> MessageProblem:
    m = loaded.message
    return MessageProblem(message_id=m.id, lead_id=m.lead_id, step_id=m.step_id, status=status, reason=reason)


def _judge(
    loaded: list[LoadedMessage],
    recent: dict[int, list[datetime]],
    *,
    playbook: Playbook,
    renderer: EmailRenderer,
    sender: Sender,
    now: datetime,
    result: DispatchResult,
) -> tuple[list[MessageUpdate], list[_Attempt]]:
    """The core's verdicts, rendered: what to write now, and what to send."""
    by_id = {item.message.id: item for item in loaded}
    settled: list[MessageUpdate] = []
    attempts: list[_Attempt] = []
    for verdict in triage([item.message for item in loaded], playbook=playbook, recent_sends=recent, now=now):
        item = by_id[verdict.message.id]
        message = verdict.message
        if verdict.verdict == Verdict.wait:
            assert verdict.until is not None
            settled.append(
                MessageUpdate(message.id, MessageStatus.queued, verdict.until, message.attempts, verdict.reason)
            )
            result.deferred[(verdict.reason or "").removeprefix("waiting for ")] += 1
        elif verdict.verdict in _SETTLED_AS:
            status = _SETTLED_AS[verdict.verdict]
            settled.append(MessageUpdate(message.id, status, message.due_at, message.attempts, verdict.reason))
            result.by_status[status] += 1
            result.problems.append(_problem(item, status, verdict.reason or ""))
        else:
            email = _render(item, verdict, playbook, renderer, sender, now)
            if isinstance(email, str):
                settled.append(MessageUpdate(message.id, MessageStatus.failed, message.due_at, message.attempts, email))
                result.by_status[MessageStatus.failed] += 1
                result.problems.append(_problem(item, MessageStatus.failed, email))
            else:
                attempts.append(_Attempt(item, verdict, email))
    return settled, attempts


def _outcome_update(
    attempt: _Attempt, outcome: SendOutcome, now: datetime, policy: RetryPolicy, version: str
) -> MessageUpdate:
    message = attempt.loaded.message
    due_at = now + policy.requeue_after if outcome.status == MessageStatus.queued else message.due_at
    return MessageUpdate(
        id=message.id,
        status=outcome.status,
        due_at=due_at,
        attempts=message.attempts + outcome.tries,
        last_error=outcome.error,
        provider_message_id=outcome.provider_message_id,
        sent_at=now if outcome.status == MessageStatus.sent else None,
        subject=attempt.email.subject,
        template=attempt.verdict.template,
        subject_template=attempt.verdict.subject,
        playbook_version=version,
        variant=attempt.verdict.variant,
    )


def _record(
    engine: Engine, owner: str, updates: Sequence[MessageUpdate], playbook: Playbook, now: datetime, at: datetime
) -> None:
    """Write outcomes and move the enrollments whose step settled, in one transaction."""
    if not updates:
        return

    def write(session: Session) -> None:
        record_outcomes(session=session, owner=owner, updates=updates, at=at)
        settle_steps(session=session, message_ids=[u.id for u in updates], playbook=playbook, at=now)
        # The outbox pattern: a failed email's webhook deliveries commit with its failure.
        failed = [u.id for u in updates if u.status == MessageStatus.failed]
        announce_failures(session=session, message_ids=failed, playbook=playbook, now=now, recorded_at=at)

    _in_transaction(engine, write)


def _in_transaction(engine: Engine, work: Callable[[Session], T]) -> T:
    """``work`` in a transaction of its own, run once more if the database connection was lost during it.

    Sends are in flight while the loop claims and records, so a connection the
    database dropped meanwhile (a restart, a failover) is met here rather than
    between groups; the pool's pre-ping opens a new one for the second try.
    """
    try:
        with session_scope(engine) as session:
            return work(session)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        logger.warning("the database connection was lost (%s); trying the transaction once more", exc.orig)
    with session_scope(engine) as session:
        return work(session)


@dataclass
class _Loop:
    """One dispatch's state: what it claimed and judged but has not launched, and its running totals."""

    engine: Engine
    playbook: Playbook
    renderer: EmailRenderer
    sender: Sender
    now: datetime
    clock: Clock
    owner: str
    lease: timedelta
    policy: RetryPolicy
    batch_size: int
    max_batches: int | None
    result: DispatchResult = field(default_factory=DispatchResult)
    pending: deque[_Attempt] = field(default_factory=deque)
    batches: int = 0
    exhausted: bool = False

    def claim(self) -> None:
        """Claim the next batch, judge it, write what is settled now, and keep its sends to launch."""
        if self.max_batches is not None and self.batches >= self.max_batches:
            self.exhausted = True
            return
        cap = self.playbook.contact_policy.frequency_cap
        now = self.now

        def claim(session: Session) -> tuple[list[int], list[LoadedMessage], dict[int, list[datetime]]]:
            ids = claim_due_messages(
                session=session,
                now=now,
                limit=self.batch_size,
                owner=self.owner,
                claimed_at=self.clock(),
                lease=self.lease,
                paused=paused_sequences(session=session),
            )
            loaded = load_claimed(session=session, ids=ids) if ids else []
            lead_ids = [item.message.lead_id for item in loaded]
            # Earlier batches' sends are all `sending` or settled by now: the cap counts them.
            recent = recent_sends(session=session, lead_ids=lead_ids, since=now - cap.per) if cap and loaded else {}
            return ids, loaded, recent

        ids, loaded, recent = _in_transaction(self.engine, claim)
        if not ids:
            self.exhausted = True
            return
        self.batches += 1
        settled, attempts = _judge(
            loaded,
            recent,
            playbook=self.playbook,
            renderer=self.renderer,
            sender=self.sender,
            now=now,
            result=self.result,
        )
        _record(self.engine, self.owner, settled, self.playbook, now, self.clock())
        self.pending.extend(attempts)
        logger.info(
            "dispatch batch %d: %d claimed, %d to send; %d waiting for the contact policy",
            self.batches,
            len(ids),
            len(attempts),
            sum(self.result.deferred.values()),
        )

    def mark(self, wave: list[_Attempt]) -> list[_Attempt]:
        """Mark a wave ``sending`` right before it leaves; returns the attempts this dispatcher still owns."""
        started = self.clock()
        ids = [a.loaded.message.id for a in wave]
        mine = _in_transaction(
            self.engine,
            lambda session: mark_sending(
                session=session, ids=ids, owner=self.owner, started_at=started, lease_until=started + self.lease
            ),
        )
        return [a for a in wave if a.loaded.message.id in mine]

    def record(self, finished: list[tuple[_Attempt, SendOutcome]]) -> None:
        """Write the outcomes that came back, in one transaction."""
        version = self.playbook.version
        updates = [_outcome_update(a, o, self.now, self.policy, version) for a, o in finished]
        _record(self.engine, self.owner, updates, self.playbook, self.now, self.clock())
        for attempt, outcome in finished:
            self.result.by_status[outcome.status] += 1
            if outcome.status in (MessageStatus.failed, MessageStatus.in_doubt):
                self.result.problems.append(_problem(attempt.loaded, outcome.status, outcome.error or ""))


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
    """Send every message due by ``now`` with up to ``concurrency`` requests in flight, recording outcomes as they come.

    Due messages are claimed a batch at a time (the next batch is claimed and
    rendered while the previous one's last requests are in flight). Sends leave
    in waves: a wave is paced, marked ``sending`` in one statement, then handed
    to the sending threads; the outcomes that came back are written together,
    and only then are their slots given to the next wave. So at most
    ``concurrency`` messages are ever ``sending`` without a recorded outcome.

    ``now`` decides what is due and is when a step counts as settled (a replay may
    pass another time); ``clock`` is the real time, which leases are measured in.
    """
    policy = policy or RetryPolicy()
    rng = random.Random()  # noqa: S311  (jitter, not a secret)
    loop = _Loop(
        engine, playbook, renderer, sender, now, clock, uuid.uuid4().hex, lease, policy, batch_size, max_batches
    )
    total = loop.result
    with session_scope(engine) as session:
        total.released, doubtful = release_expired_leases(session=session, clock=clock())
        total.found_in_doubt = len(doubtful)
        # A stopped dispatcher's sends are settled as far as their enrollments go: they move on.
        settle_steps(session=session, message_ids=doubtful, playbook=playbook, at=now)

    def send(attempt: _Attempt) -> SendOutcome:
        return send_with_retries(attempt.email, transport, policy, rng, attempts_before=attempt.loaded.message.attempts)

    concurrency = max(concurrency, 1)
    wave_cap = concurrency if pace is None else max(min(concurrency, pace.max_batch), 1)
    # Outcomes are written, and slots refilled, a few at a time rather than one by one.
    min_wave = max(1, wave_cap // 4)
    with InFlight(send, concurrency=concurrency) as flight:
        while True:
            if not loop.pending and not loop.exhausted:
                loop.claim()
                continue
            size = min(len(loop.pending), flight.free, wave_cap)
            if size and (size >= min_wave or size == len(loop.pending) or not flight.count):
                wave = [loop.pending.popleft() for _ in range(size)]
                if pace is not None:
                    pace(len(wave))
                flight.launch(loop.mark(wave))
                continue
            if not flight.count:
                break
            wanted = min_wave - flight.free if loop.pending else min_wave
            finished, error = flight.finished(at_least=max(wanted, 1))
            loop.record(finished)
            if error is not None:
                raise error
    if total.released or total.found_in_doubt:
        logger.warning(
            "a stopped dispatcher left %d claimed messages (queued again) and %d sends in doubt (not resent)",
            total.released,
            total.found_in_doubt,
        )
    return total
