"""The contact policy: quiet hours in the lead's zone, a frequency cap across sequences, priority."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nurture.contact import DueEmail, decide, quiet_until
from nurture.playbook import ContactPolicy, FrequencyCap, QuietHours
from tests.conftest import T0

NIGHT = QuietHours(start="21:00", end="08:00")  # type: ignore[arg-type]


def test_quiet_hours_are_the_leads_own_night() -> None:
    # 22:00 UTC is 07:00 in Tokyo (quiet until 08:00 there, 23:00 UTC) and 17:00 in New York.
    now = datetime(2026, 3, 2, 22, 0, tzinfo=UTC)
    assert quiet_until(NIGHT, "Asia/Tokyo", now) == datetime(2026, 3, 2, 23, 0, tzinfo=UTC)
    assert quiet_until(NIGHT, "America/New_York", now) is None
    # Before midnight in Berlin (23:00 local): quiet until 08:00 the next morning.
    assert quiet_until(NIGHT, "Europe/Berlin", now) == datetime(2026, 3, 3, 7, 0, tzinfo=UTC)


def test_quiet_hours_end_at_the_local_hour_across_a_clock_change() -> None:
    # Berlin moves to summer time on 2026-03-29: 08:00 local is 06:00 UTC that morning.
    now = datetime(2026, 3, 28, 23, 30, tzinfo=UTC)
    assert quiet_until(NIGHT, "Europe/Berlin", now) == datetime(2026, 3, 29, 6, 0, tzinfo=UTC)


def test_a_window_inside_one_day_and_unknown_zones() -> None:
    lunch = QuietHours(start="12:00", end="13:00")  # type: ignore[arg-type]
    assert quiet_until(lunch, "UTC", T0.replace(hour=12, minute=30)) == T0.replace(hour=13, minute=0)
    assert quiet_until(lunch, "UTC", T0.replace(hour=13)) is None
    assert quiet_until(NIGHT, "Not/AZone", T0.replace(hour=22)) == T0.replace(hour=8) + timedelta(days=1)


def test_the_frequency_cap_lets_the_highest_priority_through_first() -> None:
    policy = ContactPolicy(frequency_cap=FrequencyCap(max_messages=3, per="7d"))  # type: ignore[arg-type]
    sent = [T0 - timedelta(days=6), T0 - timedelta(days=2)]
    due = [
        DueEmail(1, lead_id=9, priority=100, due_at=T0 - timedelta(hours=2), timezone="UTC"),
        DueEmail(2, lead_id=9, priority=1, due_at=T0, timezone="UTC"),
        DueEmail(3, lead_id=5, priority=100, due_at=T0, timezone="UTC"),
    ]
    decisions = decide(due, policy=policy, recent_sends={9: sent}, now=T0)
    assert decisions[2] is None  # onboarding-like, priority 1: the one free slot
    assert decisions[3] is None  # another lead, nothing sent recently
    wait = decisions[1]
    assert wait is not None
    assert wait[0] == T0 - timedelta(days=6) + timedelta(days=7)  # when the oldest send leaves the window
    assert "frequency cap (3 per 7 days" in wait[1]


def test_no_policy_sends_everything() -> None:
    due = [DueEmail(i, lead_id=1, priority=100, due_at=T0, timezone="UTC") for i in range(10)]
    assert set(decide(due, policy=ContactPolicy(), recent_sends={}, now=T0).values()) == {None}
