"""How hard to try: retries with exponential backoff and full jitter, bounded.

Pure: the random source is a parameter, so tests can pin it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta


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
