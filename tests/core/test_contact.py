"""The contact policy: quiet hours and send windows in the lead's zone, a frequency cap across sequences, priority."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from nurture.contact import DueEmail, decide, quiet_until, window_opens
from nurture.playbook import ContactPolicy, FrequencyCap, QuietHours, SendWindow, Weekday
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


WORKDAYS = SendWindow(days=["mon", "tue", "wed", "thu", "fri"], between=["09:00", "17:00"])  # type: ignore[arg-type]


def _wait(email: DueEmail, policy: ContactPolicy, now: datetime) -> tuple[datetime, str] | None:
    return decide([email], policy=policy, recent_sends={}, now=now)[email.message_id]


def test_the_send_window_is_the_leads_own_working_day() -> None:
    # T0, Monday 09:00 UTC: 10:00 in Berlin (open), 18:00 in Tokyo and 04:00 in New York (closed).
    assert window_opens(WORKDAYS, "Europe/Berlin", T0) is None
    assert window_opens(WORKDAYS, "Asia/Tokyo", T0) == datetime(2026, 3, 3, 0, 0, tzinfo=UTC)  # Tue 09:00 JST
    assert window_opens(WORKDAYS, "America/New_York", T0) == datetime(2026, 3, 2, 14, 0, tzinfo=UTC)  # 09:00 EST
    # The start is inside the window, the end is not; an unknown zone is UTC.
    assert window_opens(WORKDAYS, "UTC", T0) is None
    assert window_opens(WORKDAYS, "UTC", T0.replace(hour=17)) == T0 + timedelta(days=1)
    assert window_opens(WORKDAYS, "Not/AZone", T0.replace(hour=8, minute=59)) == T0


def test_a_friday_evening_email_waits_until_monday_morning() -> None:
    friday_evening = datetime(2026, 3, 6, 17, 30, tzinfo=UTC)  # 18:30 in Berlin
    email = DueEmail(1, 7, 100, friday_evening, "Europe/Berlin", WORKDAYS)
    wait = _wait(email, ContactPolicy(quiet_hours=NIGHT), friday_evening)
    assert wait == (datetime(2026, 3, 9, 8, 0, tzinfo=UTC), "its send window (mon–fri 09:00–17:00, Europe/Berlin)")


def test_the_window_opens_at_the_local_hour_across_a_clock_change() -> None:
    # Berlin moves to summer time on Sunday 2026-03-29: Monday 09:00 is 07:00 UTC, not 08:00.
    friday = datetime(2026, 3, 27, 17, 0, tzinfo=UTC)
    assert window_opens(WORKDAYS, "Europe/Berlin", friday) == datetime(2026, 3, 30, 7, 0, tzinfo=UTC)
    # New York on Sunday 2026-03-08: Monday 09:00 EDT is 13:00 UTC, not 14:00.
    saturday = datetime(2026, 3, 7, 12, 0, tzinfo=UTC)
    assert window_opens(WORKDAYS, "America/New_York", saturday) == datetime(2026, 3, 9, 13, 0, tzinfo=UTC)
    # 02:30 does not exist in Berlin that Sunday: the window opens when the clocks jump to 03:00.
    early = SendWindow(days=["sun"], between=["02:30", "04:00"])  # type: ignore[arg-type]
    assert window_opens(early, "Europe/Berlin", friday) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    # A window the jump skips entirely opens the next Sunday (02:30 CEST is 00:30 UTC).
    skipped = SendWindow(days=["sun"], between=["02:30", "03:00"])  # type: ignore[arg-type]
    assert window_opens(skipped, "Europe/Berlin", friday) == datetime(2026, 4, 5, 0, 30, tzinfo=UTC)
    # New York repeats 01:00–02:00 on Sunday 2026-11-01: at 01:45 EDT a 00:30–01:30 window is closed,
    # and opens again when the clocks go back to 01:00 EST (06:00 UTC), not a week later.
    repeated = SendWindow(days=["sun"], between=["00:30", "01:30"])  # type: ignore[arg-type]
    assert window_opens(repeated, "America/New_York", datetime(2026, 11, 1, 5, 45, tzinfo=UTC)) == datetime(
        2026, 11, 1, 6, 0, tzinfo=UTC
    )


def test_the_days_are_shown_compactly() -> None:
    def reason(days: list[str]) -> str:
        window = SendWindow(days=days, between=["09:00", "17:00"])  # type: ignore[arg-type]
        wait = _wait(DueEmail(1, 1, 100, T0, "UTC", window), ContactPolicy(), T0.replace(hour=18))
        assert wait is not None
        return wait[1]

    assert reason(["mon", "tue", "wed", "thu", "fri"]) == "its send window (mon–fri 09:00–17:00, UTC)"
    assert reason([d.value for d in Weekday]) == "its send window (every day 09:00–17:00, UTC)"
    assert reason(["sun", "sat"]) == "its send window (sat, sun 09:00–17:00, UTC)"
    assert reason(["fri", "mon", "wed", "tue"]) == "its send window (mon–wed, fri 09:00–17:00, UTC)"


def test_an_open_window_email_goes_out_when_quiet_hours_end() -> None:
    window = SendWindow(days=["tue"], between=["06:00", "12:00"])  # type: ignore[arg-type]
    policy = ContactPolicy(quiet_hours=NIGHT)
    email = DueEmail(1, 1, 100, T0, "Europe/Berlin", window)
    tuesday_early = datetime(2026, 3, 3, 5, 30, tzinfo=UTC)  # 06:30 in Berlin: open, but quiet
    morning = datetime(2026, 3, 3, 7, 0, tzinfo=UTC)  # 08:00 in Berlin
    assert _wait(email, policy, tuesday_early) == (morning, "the end of quiet hours (Europe/Berlin)")
    assert _wait(email, policy, morning) is None


def test_quiet_hours_and_the_window_both_hold_an_email() -> None:
    # Opens Monday 07:00 in Berlin, still quiet: it goes at 08:00 (07:00 UTC), and both are named.
    window = SendWindow(days=["mon"], between=["07:00", "10:00"])  # type: ignore[arg-type]
    saturday = datetime(2026, 3, 7, 12, 0, tzinfo=UTC)
    wait = _wait(DueEmail(1, 1, 100, saturday, "Europe/Berlin", window), ContactPolicy(quiet_hours=NIGHT), saturday)
    assert wait == (
        datetime(2026, 3, 9, 7, 0, tzinfo=UTC),
        "the end of quiet hours and its send window (mon 07:00–10:00, Europe/Berlin)",
    )


def test_a_window_inside_quiet_hours_says_so() -> None:
    at_night = SendWindow(days=["sat", "sun"], between=["22:00", "23:30"])  # type: ignore[arg-type]
    wait = _wait(DueEmail(1, 1, 100, T0, "UTC", at_night), ContactPolicy(quiet_hours=NIGHT), T0)
    assert wait == (
        datetime(2026, 3, 7, 22, 0, tzinfo=UTC),
        "its send window (sat, sun 22:00–23:30, UTC), which lies inside quiet hours",
    )
    # Inside the window (and quiet) now: it waits for the next opening, not for nothing.
    saturday_night = datetime(2026, 3, 7, 22, 30, tzinfo=UTC)
    wait = _wait(DueEmail(1, 1, 100, T0, "UTC", at_night), ContactPolicy(quiet_hours=NIGHT), saturday_night)
    assert wait is not None
    assert wait[0] == datetime(2026, 3, 8, 22, 0, tzinfo=UTC)


def test_an_email_held_by_its_window_leaves_its_cap_slot_to_another() -> None:
    policy = ContactPolicy(frequency_cap=FrequencyCap(max_messages=3, per="7d"))  # type: ignore[arg-type]
    weekend = SendWindow(days=["sat", "sun"], between=["09:00", "17:00"])  # type: ignore[arg-type]
    sent = [T0 - timedelta(days=6), T0 - timedelta(days=2)]  # one slot left
    due = [
        DueEmail(1, 9, 1, T0, "UTC", weekend),  # first in priority, but its window is closed
        DueEmail(2, 9, 100, T0, "UTC"),
    ]
    decisions = decide(due, policy=policy, recent_sends={9: sent}, now=T0)
    assert decisions[2] is None
    assert decisions[1] == (datetime(2026, 3, 7, 9, 0, tzinfo=UTC), "its send window (sat, sun 09:00–17:00, UTC)")


# Property: the instant an email waits for is the first one both quiet hours and its window allow.
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Tokyo",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "America/St_Johns",
    "Not/AZone",
]
CLOCK_CHANGES = [
    ("Europe/Berlin", datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),  # spring forward, 02:00 → 03:00
    ("Europe/Berlin", datetime(2026, 10, 25, 1, 0, tzinfo=UTC)),  # fall back, 03:00 → 02:00
    ("America/New_York", datetime(2026, 3, 8, 7, 0, tzinfo=UTC)),
    ("America/New_York", datetime(2026, 11, 1, 6, 0, tzinfo=UTC)),
    ("Australia/Lord_Howe", datetime(2026, 4, 4, 15, 0, tzinfo=UTC)),  # half an hour back
]
# Clock changes happen in the small hours: times there are drawn often.
clock_times = st.builds(time, st.integers(0, 3), st.integers(0, 59)) | st.builds(
    time, st.integers(0, 23), st.integers(0, 59)
)
windows = st.builds(
    lambda days, times: SendWindow(days=tuple(sorted(days, key=lambda d: d.number)), between=times),
    st.sets(st.sampled_from(Weekday), min_size=1),
    st.lists(clock_times, min_size=2, max_size=2, unique=True).map(lambda ts: tuple(sorted(ts))),
)
quiet_hours = st.none() | st.lists(clock_times, min_size=2, max_size=2, unique=True).map(
    lambda ts: QuietHours(start=ts[0], end=ts[1])
)
# A lead's zone and the moment an email of theirs is judged: anywhen, or in the days around a clock change there.
leads_at = st.tuples(
    st.sampled_from(ZONES),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1)).map(lambda d: d.replace(tzinfo=UTC)),
) | st.builds(
    lambda change, minutes: (change[0], change[1] + timedelta(minutes=minutes)),
    st.sampled_from(CLOCK_CHANGES),
    st.integers(-7 * 24 * 60, 24 * 60),
)


def _allowed(window: SendWindow, quiet: QuietHours | None, zone: ZoneInfo, at: datetime) -> tuple[bool, bool]:
    """(inside the window, outside quiet hours) at ``at``, on the lead's clock."""
    local = at.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    start, end = window.between
    inside = local.weekday() in {d.number for d in window.days} and start <= clock < end
    if quiet is None:
        return inside, True
    if quiet.start > quiet.end:
        return inside, not (clock >= quiet.start or clock < quiet.end)
    return inside, not (quiet.start <= clock < quiet.end)


@given(window=windows, quiet=quiet_hours, lead_at=leads_at)
def test_the_wait_is_the_first_instant_both_allow(
    window: SendWindow, quiet: QuietHours | None, lead_at: tuple[str, datetime]
) -> None:
    timezone, now = lead_at
    zone = ZoneInfo("UTC" if timezone == "Not/AZone" else timezone)
    wait = _wait(DueEmail(1, 1, 100, now, timezone, window), ContactPolicy(quiet_hours=quiet), now)
    until = now if wait is None else wait[0]
    assert until >= now
    inside, not_quiet = _allowed(window, quiet, zone, until)
    assert inside
    quarter_hours = [now + timedelta(minutes=15 * k) for k in range(8 * 24 * 4)]
    if wait is not None and "inside quiet hours" in wait[1]:
        assert not any(all(_allowed(window, quiet, zone, t)) for t in quarter_hours)
        return
    assert not_quiet
    assert not any(all(_allowed(window, quiet, zone, t)) for t in quarter_hours if t < until)
