"""Outbound webhooks: what each one is told, in which body, signed how, and what a response means.

A fact (a lead moved stage, reached a sequence's goal, or one of its emails failed) becomes
one delivery per webhook of the playbook that wants it: a row of the ``webhook_delivery``
outbox written in the transaction of the fact, with its body built then. A dispatcher
delivers the rows (``flows/webhooks.py``) with the discipline of email:

    queued → claimed → sending → delivered
                     ↘ failed (a retry is due at ``due_at``) → ... → dead (out of attempts, or refused)
                     ↘ in_doubt (the request left, no answer came: never resent blindly)

Every request is signed: ``Nurture-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``,
and carries its delivery id (``Nurture-Delivery-Id``, the same on every attempt) so a
receiver can drop a copy an operator's retry sent again.

Pure: times and the random source are parameters.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from nurture.delivery import RetryPolicy, backoff_seconds
from nurture.playbook import Playbook, Stage, WebhookEvent

__all__ = ["WebhookEvent"]

SIGNATURE_HEADER = "Nurture-Signature"
DELIVERY_HEADER = "Nurture-Delivery-Id"
EVENT_HEADER = "Nurture-Event"
DEFAULT_SECRET_ENV = "NURTURE_WEBHOOK_SECRET"  # noqa: S105  (the variable's name, not a secret)
# Seconds a request may take, connecting included; an answer later than this leaves the delivery in doubt.
TIMEOUT_SECONDS = 10.0
# Between attempts: full jitter up to 30 s · 2^attempt, capped at an hour; dead after 8 attempts (~4 hours).
WEBHOOK_RETRIES = RetryPolicy(base_seconds=30.0, cap_seconds=3600.0, max_attempts=8)
_DELIVERY_NAMESPACE = uuid.UUID("5b0f7c1e-8f1d-4a57-9c55-3e1f0b6d2a10")


class DeliveryStatus(StrEnum):
    queued = "queued"
    claimed = "claimed"
    sending = "sending"
    delivered = "delivered"
    # The last attempt failed (5xx, 408, 429, no connection); the next is due at ``due_at``.
    failed = "failed"
    # The request left and no answer came: the receiver may have it; never resent blindly.
    in_doubt = "in_doubt"
    # Refused (4xx) or out of attempts: the dead letter, re-queued only by `nurture messages retry --webhooks`.
    dead = "dead"


# A dispatcher takes these when due.
DUE = (DeliveryStatus.queued, DeliveryStatus.failed)
# An operator may queue these again.
OPERATOR_RETRYABLE = (DeliveryStatus.dead, DeliveryStatus.in_doubt)
# Profile fields that identify a person: in a Prefect event only when NURTURE_PREFECT_EVENTS_PERSONAL_DATA is on.
PERSONAL_FIELDS = (
    "email",
    "first_name",
    "last_name",
    "name",
    "company",
    "job_title",
    "company_size",
    "country",
    "timezone",
    "attributes",
)


@dataclass(frozen=True, slots=True)
class LeadFacts:
    """A lead as a webhook tells it: its profile, stage and score, and the score's last change rule by rule."""

    id: int
    email: str
    first_name: str | None
    last_name: str | None
    company: str | None
    job_title: str | None
    company_size: int | None
    country: str | None
    timezone: str
    attributes: Mapping[str, Any]
    stage: str
    score: float
    fit_score: float
    engagement: float
    # The latest score change's contributions (rule → points), and when it was made.
    breakdown: Mapping[str, float] = field(default_factory=dict)
    scored_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        name = " ".join(part for part in (self.first_name, self.last_name) if part) or None
        return {
            "id": self.id,
            "email": self.email,
            "name": name,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "company": self.company,
            "job_title": self.job_title,
            "company_size": self.company_size,
            "country": self.country,
            "timezone": self.timezone,
            "attributes": dict(self.attributes),
            "stage": self.stage,
            "score": round(self.score, 4),
            "fit_score": round(self.fit_score, 4),
            "engagement": round(self.engagement, 4),
        }


@dataclass(frozen=True, slots=True)
class Fact:
    """Something that happened to a lead, which webhooks and Prefect events tell.

    ``subject`` names it uniquely (``transition-12``, ``enrollment-7``,
    ``message-40/2026-03-02T09:00:00.000000``): with the event and the URL it is the
    delivery's idempotency key, so a replayed cycle enqueues nothing twice.
    """

    event: WebhookEvent
    subject: str
    occurred_at: datetime
    lead: LeadFacts
    # The "transition", "conversion" or "message" object of the body.
    detail: Mapping[str, Any]
    to_stage: Stage | None = None

    @property
    def detail_key(self) -> str:
        return {
            WebhookEvent.transitioned: "transition",
            WebhookEvent.converted: "conversion",
            WebhookEvent.message_failed: "message",
        }[self.event]


def transition_fact(
    lead: LeadFacts, *, transition_id: int, from_stage: Stage, to_stage: Stage, at: datetime, reason: str
) -> Fact:
    return Fact(
        WebhookEvent.transitioned,
        f"transition-{transition_id}",
        at,
        lead,
        {"id": transition_id, "from": from_stage.value, "to": to_stage.value, "at": _iso(at), "reason": reason},
        to_stage,
    )


def conversion_fact(
    lead: LeadFacts, *, enrollment_id: int, sequence: str, goal: str, at: datetime, after_step: str | None
) -> Fact:
    return Fact(
        WebhookEvent.converted,
        f"enrollment-{enrollment_id}",
        at,
        lead,
        {"enrollment_id": enrollment_id, "sequence": sequence, "goal": goal, "at": _iso(at), "after_step": after_step},
    )


def failure_fact(
    lead: LeadFacts,
    *,
    message_id: int,
    sequence: str,
    step_id: str,
    error: str | None,
    at: datetime,
    recorded_at: datetime,
) -> Fact:
    """An email that failed at ``at`` (the dispatch's time), its failure recorded at ``recorded_at`` (wall
    clock: a message retried by an operator and failing again is another fact)."""
    return Fact(
        WebhookEvent.message_failed,
        f"message-{message_id}/{recorded_at:%Y-%m-%dT%H:%M:%S.%f}",
        at,
        lead,
        {"id": message_id, "sequence": sequence, "step": step_id, "error": error, "at": _iso(at)},
    )


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def idempotency_key(fact: Fact, url: str) -> str:
    """``lead.transitioned/transition-12/<hash of the URL>``: one delivery per fact and receiver."""
    return f"{fact.event.value}/{fact.subject}/{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def delivery_id(key: str) -> str:
    """The delivery's id, derived from its key: the same on every attempt and in every replay."""
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, key))


def body(fact: Fact, *, delivery: str, playbook_version: str) -> dict[str, Any]:
    """The JSON a webhook receives (docs/webhooks.md shows one)."""
    return {
        "event": fact.event.value,
        "delivery_id": delivery,
        "occurred_at": _iso(fact.occurred_at),
        "playbook_version": playbook_version,
        "lead": fact.lead.as_json(),
        "score_breakdown": {rule: round(points, 4) for rule, points in fact.lead.breakdown.items()},
        fact.detail_key: dict(fact.detail),
    }


def event_payload(fact: Fact, *, playbook_version: str, personal_data: bool) -> dict[str, Any]:
    """A Prefect event's payload: the webhook's content, without who the lead is unless ``personal_data``."""
    lead = fact.lead.as_json()
    if not personal_data:
        lead = {k: v for k, v in lead.items() if k not in PERSONAL_FIELDS}
    return {
        "occurred_at": _iso(fact.occurred_at),
        "playbook_version": playbook_version,
        "lead": lead,
        "score_breakdown": {rule: round(points, 4) for rule, points in fact.lead.breakdown.items()},
        fact.detail_key: dict(fact.detail),
    }


def encode(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes sent (and signed): compact JSON, keys sorted, so every attempt sends the same body."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature(secret: str, timestamp: int, payload: bytes) -> str:
    """``t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``."""
    signed = str(timestamp).encode() + b"." + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True, slots=True)
class PlannedDelivery:
    """A row of the webhook outbox, as the fact's transaction writes it."""

    lead_id: int
    webhook: str
    url: str
    event: WebhookEvent
    idempotency_key: str
    delivery_id: str
    payload: dict[str, Any]
    due_at: datetime


def plan_deliveries(facts: Iterable[Fact], *, playbook: Playbook, now: datetime) -> list[PlannedDelivery]:
    """One delivery per fact and webhook that wants it, due ``now``."""
    hooks = playbook.named_webhooks()
    planned = []
    for fact in facts:
        for name, hook in hooks:
            if not hook.wants(fact.event, fact.to_stage):
                continue
            key = idempotency_key(fact, hook.url)
            ident = delivery_id(key)
            planned.append(
                PlannedDelivery(
                    lead_id=fact.lead.id,
                    webhook=name,
                    url=hook.url,
                    event=fact.event,
                    idempotency_key=key,
                    delivery_id=ident,
                    payload=body(fact, delivery=ident, playbook_version=playbook.version),
                    due_at=now,
                )
            )
    return planned


def wanted_events(playbook: Playbook) -> frozenset[WebhookEvent]:
    """The events some webhook of the playbook is told about (none: no fact is looked up for webhooks)."""
    return frozenset(event for hook in playbook.webhooks for event in hook.events)


def secret_names(playbook: Playbook) -> dict[str, str]:
    """Each webhook's name → the environment variable holding its signing secret."""
    return {name: hook.secret_env or DEFAULT_SECRET_ENV for name, hook in playbook.named_webhooks()}


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one request ended: a status code, or no answer (``left``: whether the request may have arrived)."""

    status_code: int | None = None
    error: str | None = None
    left: bool = True
    retry_after_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    status: DeliveryStatus
    due_at: datetime
    error: str | None = None


def judge(
    attempt: Attempt, *, attempts: int, now: datetime, rng: random.Random, policy: RetryPolicy = WEBHOOK_RETRIES
) -> DeliveryOutcome:
    """What becomes of a delivery after its ``attempts``-th attempt ended as ``attempt``.

    2xx: delivered. 408, 429, 5xx, or no connection: failed, the next attempt due after a
    jittered exponential backoff (never before a 429's Retry-After), dead after
    ``policy.max_attempts``. Any other status (4xx, a redirect): dead at once, the receiver
    refused it. No answer after the request left (a timeout, a dropped connection): in doubt.
    """
    code = attempt.status_code
    if code is not None and 200 <= code < 300:
        return DeliveryOutcome(DeliveryStatus.delivered, now)
    if code is None and attempt.left:
        return DeliveryOutcome(
            DeliveryStatus.in_doubt, now, f"outcome unknown, not resent: {attempt.error or 'no answer'}"
        )
    why = f"HTTP {code}" if code is not None else f"no connection: {attempt.error}"
    if code is not None and attempt.error:
        why += f": {attempt.error}"
    if code is not None and not (code in (408, 429) or code >= 500):
        return DeliveryOutcome(DeliveryStatus.dead, now, f"refused ({why}); not retried")
    if attempts >= policy.max_attempts:
        return DeliveryOutcome(DeliveryStatus.dead, now, f"gave up after {attempts} attempts ({why})")
    wait = max(backoff_seconds(policy, attempts, rng), attempt.retry_after_seconds or 0.0, 1.0)
    return DeliveryOutcome(DeliveryStatus.failed, now + timedelta(seconds=wait), why)


def missing_secrets(playbook: Playbook, available: Mapping[str, str]) -> list[str]:
    """The environment variables the playbook's webhooks sign with that ``available`` lacks (or has empty)."""
    return sorted({env for env in secret_names(playbook).values() if not (available.get(env) or "").strip()})


def secrets_problem(missing: Sequence[str]) -> str:
    """What to say when webhooks cannot be signed."""
    names = ", ".join(missing)
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"{names} {verb} not set, and the playbook's webhooks are signed with it: nurture never sends a webhook "
        f"unsigned; set {names} to the secret the receiver verifies with (docs/webhooks.md)"
    )
