"""The shared send rate holds: dispatch through the real Prefect rate limit, measured at the fake."""

from __future__ import annotations

import bisect

import pytest

from db.engine import get_engine, upgrade_schema
from flows.cycle import dispatch_messages
from flows.runtime import reset_runtime
from tests.db.test_delivery import NOW, _hot_leads
from tests.db.world import World
from tests.fakes.fake_sendgrid import FakeSendGrid

RATE = 10


def test_the_send_rate_is_not_exceeded(
    prefect_api: str,
    nurture_env: dict[str, str],
    playbook,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    engine = get_engine(nurture_env["NURTURE_DATABASE_URL"])
    upgrade_schema(engine)
    _hot_leads(World(engine, playbook), 40)
    with FakeSendGrid() as fake:
        for name, value in {
            "NURTURE_TRANSPORT": "sendgrid",
            "SENDGRID_API_KEY": fake.api_key,
            "SENDGRID_API_HOST": fake.url,
            "NURTURE_SECRET_KEY": "a-real-secret",
            "NURTURE_SEND_RATE": str(RATE),
            "NURTURE_SEND_CONCURRENCY": "4",
        }.items():
            monkeypatch.setenv(name, value)
        reset_runtime()
        assert dispatch_messages(now=NOW) == {"sent": 40}
        times = sorted(fake.accepted_at)
    assert len(times) == 40
    # The limit starts with RATE free slots, then frees RATE per second: in the first t seconds
    # at most RATE·(t + 1) sends may start (one extra slot of slack for timer granularity).
    start = times[0]
    for t in (0.5, 1.0, 1.5, 2.0, 2.5):
        started = bisect.bisect_right(times, start + t)
        assert started <= RATE * (t + 1) + 1, f"{started} sends in the first {t} s"
    assert times[-1] - start >= (40 - RATE) / RATE - 0.5
