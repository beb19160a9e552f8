"""What a message can become, and how hard to try: statuses, send outcomes, retries with backoff.

A message walks ``queued → claimed → sending → sent``. The two middle steps
are what make a crash safe:

- ``claimed``: a dispatcher holds it under a lease but no request has started.
  If the dispatcher dies, the lease runs out and the message is ``queued`` again.
- ``sending``: marked in small groups right before the requests leave. If the
  dispatcher dies now, nobody can know whether the provider accepted it, so when
  the lease runs out it becomes ``in_doubt``: never resent blindly, settled by the
  provider's own events (``processed``, ``delivered``, ``bounce``) or by an operator.

Pure: the random source is a parameter, so tests can pin it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class MessageStatus(StrEnum):
    queued = "queued"
    claimed = "claimed"
    sending = "sending"
    sent = "sent"
    failed = "failed"
    in_doubt = "in_doubt"
    suppressed = "suppressed"
    cancelled = "cancelled"
    # A step whose unless / only_if condition said not to send it: recorded, never sent.
    skipped = "skipped"


# A dispatcher may still act on these; an enrollment with one of them is not finished.
UNFINISHED = (MessageStatus.queued, MessageStatus.claimed, MessageStatus.sending)
# What an operator may send again with `nurture messages retry`.
RETRYABLE = (MessageStatus.failed, MessageStatus.in_doubt)
# Statuses whose email may have reached the lead: they count against the frequency cap.
MAYBE_DELIVERED = (MessageStatus.sent, MessageStatus.sending, MessageStatus.in_doubt)


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What became of one email in one dispatch.

    ``status`` is ``sent``, ``failed`` (permanent, or out of attempts),
    ``queued`` (a transient error: try again in a later dispatch) or
    ``in_doubt`` (the request left and no answer came).
    """

    status: MessageStatus
    tries: int
    provider_message_id: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of one send inside a dispatch, then a later dispatch, then give up."""

    attempts_per_dispatch: int = 6
    base_seconds: float = 0.2
    cap_seconds: float = 5.0
    # A 429 asking for a longer wait than this is not waited out: the message is requeued.
    max_rate_limit_wait_seconds: float = 30.0
    requeue_after: timedelta = timedelta(minutes=5)
    max_attempts: int = 30


def backoff_seconds(policy: RetryPolicy, attempt: int, rng: random.Random) -> float:
    """Full jitter: a random wait up to ``base · 2^attempt``, capped (AWS architecture blog's advice)."""
    return rng.uniform(0, min(policy.cap_seconds, policy.base_seconds * 2**attempt))


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    """A due message this dispatcher holds, with what is needed to judge and address it."""

    id: int
    lead_id: int
    sequence: str
    step_id: str
    attempts: int
    due_at: datetime
    email: str
    timezone: str
    # Why the lead must not be mailed (its own flag or the suppression list), or None.
    suppressed: str | None
    # The split test's variant decided with the step (None: no split test then).
    variant: str | None = None
