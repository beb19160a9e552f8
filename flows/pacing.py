"""A send rate shared by every dispatcher, through a Prefect global concurrency limit.

The limit ``nurture-send`` has ``ceil(rate)`` slots that free at ``rate`` per
second, so however many dispatchers run, together they start at most ``rate``
sends per second. Slots are taken per group of sends (one API round trip per
group), not per message.
"""

from __future__ import annotations

import math

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import rate_limit

SEND_LIMIT = "nurture-send"


class SendPacer:
    """Blocks until the next group of sends fits the shared rate; groups are at most ``max_batch``."""

    def __init__(self, rate: float) -> None:
        self.max_batch = max(1, math.ceil(rate))
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(SEND_LIMIT, self.max_batch, slot_decay_per_second=rate)

    def __call__(self, count: int) -> None:
        remaining = count
        while remaining > 0:
            take = min(remaining, self.max_batch)
            rate_limit(SEND_LIMIT, occupy=take, strict=True)
            remaining -= take


def send_pacer(rate: float) -> SendPacer | None:
    """The shared pacer for ``rate`` sends per second; None when the rate is 0 (off)."""
    return SendPacer(rate) if rate > 0 else None
