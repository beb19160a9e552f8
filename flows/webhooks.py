"""Outbound webhooks: facts written to the outbox in their own transaction, and the dispatcher that delivers them.

``announce_*`` run inside the transaction that records the fact (a chunk's transitions
and conversions, a dispatch's failed emails): they load the leads as webhooks tell them,
and write one ``webhook_delivery`` row per webhook that wants the fact (the outbox
pattern: the fact and its deliveries commit together or not at all).

:func:`deliver_webhooks` is the dispatcher, with the discipline of the email one
(``flows/sending.py``): claim due rows under a lease, mark a wave ``sending`` right
before its requests leave, record the outcomes. Killed at any instant, it leaves at most
one wave (``concurrency`` requests) in doubt, never resent blindly.

No Prefect here: the cycle and dispatch flows call these, and so do tests.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Protocol

import httpx
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from db.cycle import ChunkResult
from db.engine import session_scope
from db.webhooks import (
    ClaimedDelivery,
    DeliveryUpdate,
    claim_due,
    enqueue_deliveries,
    failed_messages,
    lead_facts,
    mark_sending,
    record_outcomes,
    release_expired_leases,
)
from nurture import __version__
from nurture.errors import ConfigurationError
from nurture.playbook import Playbook
from nurture.sequences import Conversion, GoalCandidate, Transition
from nurture.webhooks import (
    DEFAULT_SECRET_ENV,
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMEOUT_SECONDS,
    Attempt,
    DeliveryStatus,
    Fact,
    WebhookEvent,
    conversion_fact,
    encode,
    failure_fact,
    judge,
    missing_secrets,
    plan_deliveries,
    secret_names,
    secrets_problem,
    signature,
    transition_fact,
    wanted_events,
)

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
LEASE = timedelta(minutes=5)


def _enqueue(session: Session, facts: Sequence[Fact], playbook: Playbook, now: datetime) -> int:
    wanted = wanted_events(playbook)
    facts = [f for f in facts if f.event in wanted]
    return enqueue_deliveries(session=session, planned=plan_deliveries(facts, playbook=playbook, now=now), now=now)


def announce_transitions(
    *,
    session: Session,
    transitions: Sequence[Transition],
    reasons: Sequence[str],
    playbook: Playbook,
    now: datetime,
    result: ChunkResult,
) -> int:
    """The transitions as facts (kept in ``result`` for Prefect events) and their webhook deliveries; returns
    how many deliveries were queued."""
    if not transitions:
        return 0
    leads = lead_facts(session=session, lead_ids=[t.lead_id for t in transitions])
    facts = [
        transition_fact(
            leads[t.lead_id],
            transition_id=t.transition_id,
            from_stage=t.from_stage,
            to_stage=t.to_stage,
            at=now,
            reason=reason,
        )
        for t, reason in zip(transitions, reasons, strict=True)
        if t.lead_id in leads
    ]
    result.facts.extend(facts)
    return _enqueue(session, facts, playbook, now)


def announce_conversions(
    *,
    session: Session,
    conversions: Sequence[Conversion],
    candidates: Sequence[GoalCandidate],
    playbook: Playbook,
    now: datetime,
    result: ChunkResult,
) -> int:
    """The conversions as facts (kept in ``result``) and their webhook deliveries."""
    if not conversions:
        return 0
    enrollments = {c.enrollment.id: c.enrollment for c in candidates}
    leads = lead_facts(session=session, lead_ids=[enrollments[c.enrollment_id].lead_id for c in conversions])
    facts = []
    for conversion in conversions:
        enrollment = enrollments[conversion.enrollment_id]
        if enrollment.lead_id in leads:
            facts.append(
                conversion_fact(
                    leads[enrollment.lead_id],
                    enrollment_id=enrollment.id,
                    sequence=enrollment.sequence,
                    goal=conversion.kind,
                    at=conversion.at,
                    after_step=conversion.after_step,
                )
            )
    result.facts.extend(facts)
    return _enqueue(session, facts, playbook, now)


def announce_failures(
    *, session: Session, message_ids: Sequence[int], playbook: Playbook, now: datetime, recorded_at: datetime
) -> int:
    """Deliveries for those of these messages that just failed (in the transaction recording it), due ``now``."""
    if WebhookEvent.message_failed not in wanted_events(playbook) or not message_ids:
        return 0
    failed = failed_messages(session=session, ids=message_ids)
    if not failed:
        return 0
    leads = lead_facts(session=session, lead_ids=[m.lead_id for m in failed])
    facts = [
        failure_fact(
            leads[m.lead_id],
            message_id=m.id,
            sequence=m.sequence,
            step_id=m.step_id,
            error=m.error,
            at=now,
            recorded_at=recorded_at,
        )
        for m in failed
        if m.lead_id in leads
    ]
    return _enqueue(session, facts, playbook, now)


def webhook_secrets(playbook: Playbook, environment: Mapping[str, str]) -> dict[str, str]:
    """Each webhook's signing secret by webhook name; ConfigurationError naming what is missing.

    ``environment`` is the process environment with NURTURE_WEBHOOK_SECRET as the settings read it.
    """
    if not playbook.webhooks:
        return {}
    missing = missing_secrets(playbook, environment)
    if missing:
        raise ConfigurationError(secrets_problem(missing))
    return {name: environment[env].strip() for name, env in secret_names(playbook).items()}


class WebhookPoster(Protocol):
    """Makes one request; never raises for what the network or the receiver did."""

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Attempt: ...


class HttpPoster:
    """POSTs with httpx: one client (kept-alive connections), a timeout, redirects not followed."""

    def __init__(self, timeout: float = TIMEOUT_SECONDS) -> None:
        self.client = httpx.Client(
            timeout=timeout, follow_redirects=False, headers={"User-Agent": f"nurture/{__version__}"}
        )

    def close(self) -> None:
        self.client.close()

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Attempt:
        try:
            response = self.client.post(url, content=body, headers=dict(headers))
        except (
            httpx.ConnectError,
            httpx.ConnectTimeout,
            httpx.PoolTimeout,
            httpx.UnsupportedProtocol,
            httpx.InvalidURL,
        ) as exc:
            return Attempt(error=f"{type(exc).__name__}: {exc}", left=False)
        except httpx.TransportError as exc:  # read/write timeouts, a connection dropped mid-request
            return Attempt(error=f"{type(exc).__name__}: {exc}", left=True)
        error = None if response.is_success else response.text[:200] or None
        return Attempt(response.status_code, error=error, retry_after_seconds=_retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    date = response.headers.get("Date")
    base = parsedate_to_datetime(date) if date else None
    return max(0.0, (when - base).total_seconds()) if base else None


@dataclass
class WebhookResult:
    """What one delivery run did: outcomes by status, and what a stopped dispatcher had left."""

    by_status: Counter[str] = field(default_factory=Counter)
    released: int = 0
    found_in_doubt: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def dead(self) -> int:
        return self.by_status.get(DeliveryStatus.dead, 0)

    @property
    def in_doubt(self) -> int:
        return self.by_status.get(DeliveryStatus.in_doubt, 0) + self.found_in_doubt

    def as_json(self) -> dict[str, int]:
        summary = {str(k): v for k, v in sorted(self.by_status.items())}
        if self.found_in_doubt:
            summary["in_doubt_from_stopped_dispatchers"] = self.found_in_doubt
        return summary


def _headers(claimed: ClaimedDelivery, body: bytes, secret: str, at: datetime) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(secret, int(at.timestamp()), body),
        DELIVERY_HEADER: claimed.delivery_id,
        EVENT_HEADER: claimed.event,
    }


def deliver_webhooks(
    *,
    engine: Engine,
    secrets: Mapping[str, str],
    now: datetime,
    clock: Clock,
    poster: WebhookPoster,
    batch_size: int = 100,
    concurrency: int = 4,
    lease: timedelta = LEASE,
    rng: random.Random | None = None,
    max_batches: int | None = None,
) -> WebhookResult:
    """Deliver every webhook due by ``now``, ``concurrency`` requests at a time; returns what became of them.

    ``secrets`` maps each webhook's name to its signing secret: a delivery whose webhook is no
    longer in the playbook (so has no secret) is dead, never sent unsigned. ``now`` decides what
    is due and when a retry is; ``clock`` is the real time (leases, signatures).
    """
    rng = rng or random.Random()  # noqa: S311  (jitter, not a secret)
    owner = uuid.uuid4().hex
    result = WebhookResult()
    with session_scope(engine) as session:
        result.released, result.found_in_doubt = release_expired_leases(session=session, clock=clock())
    if result.found_in_doubt:
        logger.warning("%d webhook deliveries of a stopped dispatcher are in doubt (not resent)", result.found_in_doubt)
    batches = 0
    with ThreadPoolExecutor(max_workers=max(concurrency, 1), thread_name_prefix="webhook") as pool:
        while max_batches is None or batches < max_batches:
            with session_scope(engine) as session:
                claimed = claim_due(
                    session=session, now=now, limit=batch_size, owner=owner, claimed_at=clock(), lease=lease
                )
            if not claimed:
                break
            batches += 1
            orphans = [c for c in claimed if c.webhook not in secrets]
            if orphans:
                _record(
                    engine,
                    owner,
                    [
                        DeliveryUpdate(
                            c.id,
                            DeliveryStatus.dead,
                            now,
                            c.attempts,
                            f"webhook {c.webhook!r} is no longer in the playbook: not sent",
                        )
                        for c in orphans
                    ],
                    clock(),
                    result,
                )
            sendable = [c for c in claimed if c.webhook in secrets]
            for start in range(0, len(sendable), max(concurrency, 1)):
                _wave(
                    engine,
                    owner,
                    sendable[start : start + concurrency],
                    secrets,
                    now,
                    clock,
                    lease,
                    poster,
                    pool,
                    rng,
                    result,
                )
    return result


def _wave(
    engine: Engine,
    owner: str,
    wave: Sequence[ClaimedDelivery],
    secrets: Mapping[str, str],
    now: datetime,
    clock: Clock,
    lease: timedelta,
    poster: WebhookPoster,
    pool: ThreadPoolExecutor,
    rng: random.Random,
    result: WebhookResult,
) -> None:
    """Mark a wave ``sending``, make its requests side by side, record every outcome in one transaction."""
    started = clock()
    with session_scope(engine) as session:
        mine = mark_sending(
            session=session, ids=[c.id for c in wave], owner=owner, started_at=started, lease_until=started + lease
        )
    sending = [c for c in wave if c.id in mine]

    def send(claimed: ClaimedDelivery) -> Attempt:
        body = encode(claimed.payload)
        return poster.post(claimed.url, body, _headers(claimed, body, secrets[claimed.webhook], clock()))

    attempts = list(pool.map(send, sending))
    at = clock()
    updates = []
    for claimed, attempt in zip(sending, attempts, strict=True):
        tries = claimed.attempts + 1
        outcome = judge(attempt, attempts=tries, now=now, rng=rng)
        updates.append(
            DeliveryUpdate(
                claimed.id,
                outcome.status,
                outcome.due_at,
                tries,
                outcome.error,
                attempt.status_code,
                at if outcome.status == DeliveryStatus.delivered else None,
            )
        )
    _record(engine, owner, updates, at, result)


def _record(engine: Engine, owner: str, updates: Sequence[DeliveryUpdate], at: datetime, result: WebhookResult) -> None:
    with session_scope(engine) as session:
        record_outcomes(session=session, owner=owner, updates=updates, at=at)
    for update in updates:
        result.by_status[update.status] += 1
        if update.status in (DeliveryStatus.dead, DeliveryStatus.in_doubt):
            result.problems.append(f"webhook delivery {update.id} {update.status}: {update.error}")


__all__ = ["DEFAULT_SECRET_ENV", "HttpPoster", "WebhookResult", "deliver_webhooks", "webhook_secrets"]
