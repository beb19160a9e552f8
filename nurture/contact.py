"""The contact policy: whether a due email may go out now, or when it may.

Applied when an email becomes due (not when it was queued), so a lead who moved
to another time zone, or who received other emails meanwhile, is judged as
things are now. Quiet hours are the lead's own night; the frequency cap counts
every email sent to the lead across sequences, and when it bites the sequence
with the lowest ``priority`` number goes first. A send window (the sequence's
own, else the policy's) lets an email out only on some weekdays between two
times of the lead's day, on top of quiet hours; an email it holds waits for the
next opening and does not take a slot of the frequency cap.

Pure: no clock, no database.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nurture.playbook import ContactPolicy, QuietHours, SendWindow, Weekday

# Steps when walking the lead's clock forward: each step reaches the wall-clock time it aims
# for or stops at a clock change on the way, and a week holds very few of those.
_STEPS = 16
# A send window opens within 7 days; beyond this, quiet hours cover all of it.
_HORIZON = timedelta(days=8)


@dataclass(frozen=True, slots=True)
class DueEmail:
    message_id: int
    lead_id: int
    priority: int
    due_at: datetime
    timezone: str
    send_window: SendWindow | None = None


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _wall(at: datetime, zone: ZoneInfo) -> datetime:
    """What the lead's clock shows at ``at`` (naive)."""
    return at.astimezone(zone).replace(tzinfo=None)


def _offset(at: datetime, zone: ZoneInfo) -> timedelta:
    return at.astimezone(zone).utcoffset() or timedelta(0)


def _toward(zone: ZoneInfo, at: datetime, wall: datetime) -> datetime:
    """The instant after ``at`` when the lead's clock shows ``wall``, or the clock change before it.

    Built from the wall-clock time, not by adding hours, so a daylight-saving change lands on
    the right hour. Callers look again at a clock change: a spring-forward jump may skip
    ``wall`` (02:30 on that night: the jump to 03:00 is when it is reached), and a fall-back
    jump may re-enter an hour already passed.
    """
    offset = _offset(at, zone)
    reached = (wall - offset).replace(tzinfo=UTC)
    if _offset(reached, zone) == offset:
        return reached
    # The clocks change in between: find when, to the microsecond (the zone data is in seconds).
    before, after = at, reached
    while after - before > timedelta(microseconds=1):
        middle = before + (after - before) // 2
        if _offset(middle, zone) == offset:
            before = middle
        else:
            after = middle
    return after


def _quiet(quiet: QuietHours, clock: time) -> bool:
    # A window that spans midnight (21:00 → 08:00) is the part outside end → start.
    if quiet.start > quiet.end:
        return clock >= quiet.start or clock < quiet.end
    return quiet.start <= clock < quiet.end


def quiet_until(quiet: QuietHours, timezone: str, now: datetime) -> datetime | None:
    """When the lead's quiet hours end, if ``now`` falls inside them; else None."""
    zone = _zone(timezone)
    at = now.astimezone(UTC)
    for _ in range(_STEPS):
        local = _wall(at, zone)
        if not _quiet(quiet, local.time()):
            break
        end = datetime.combine(local.date(), quiet.end)
        if end <= local:
            end += timedelta(days=1)
        at = _toward(zone, at, end)
    return None if at == now else at


def _open(window: SendWindow, local: datetime) -> bool:
    start, end = window.between
    return any(day.number == local.weekday() for day in window.days) and start <= local.time() < end


def _next_start(window: SendWindow, local: datetime) -> datetime:
    """The next time after ``local`` (wall-clock) the window opens: a listed day, at its start."""
    numbers = {day.number for day in window.days}
    for ahead in range(8):  # the same weekday a week later is after ``local``
        day = local.date() + timedelta(days=ahead)
        start = datetime.combine(day, window.between[0])
        if day.weekday() in numbers and start > local:
            return start
    raise ValueError("a send window needs at least one day")


def _next_opening(window: SendWindow, zone: ZoneInfo, after: datetime) -> datetime:
    """The first instant after ``after`` when the window opens, in the lead's zone."""
    at = after
    for _ in range(_STEPS):
        at = _toward(zone, at, _next_start(window, _wall(at, zone)))
        if _open(window, _wall(at, zone)):
            break
    return at


def window_opens(window: SendWindow, timezone: str, now: datetime) -> datetime | None:
    """When the lead's send window next opens, if ``now`` is outside it; else None."""
    zone = _zone(timezone)
    if _open(window, _wall(now, zone)):
        return None
    return _next_opening(window, zone, now.astimezone(UTC))


def _described(window: SendWindow, timezone: str) -> str:
    """``mon–fri 09:00–17:00, Europe/Berlin``: what a marketer wrote, in a few characters."""
    numbers = sorted(day.number for day in window.days)
    names = list(Weekday)
    runs: list[list[int]] = []
    for number in numbers:
        if runs and runs[-1][-1] == number - 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    parts: list[str] = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"{names[run[0]]}–{names[run[-1]]}")
        else:
            parts.extend(names[n] for n in run)
    days = "every day" if len(numbers) == 7 else ", ".join(parts)
    start, end = window.between
    return f"{days} {start:%H:%M}–{end:%H:%M}, {timezone}"


def _hold(email: DueEmail, quiet: QuietHours | None, now: datetime) -> tuple[datetime, str] | None:
    """Until when quiet hours and the email's send window hold it (both must allow it), and why."""
    window = email.send_window
    quiet_end = quiet_until(quiet, email.timezone, now) if quiet is not None else None
    quiet_reason = f"the end of quiet hours ({email.timezone})"
    if window is None:
        return None if quiet_end is None else (quiet_end, quiet_reason)
    zone = _zone(email.timezone)
    described = _described(window, email.timezone)
    # The earliest instant both allow: each step moves past what holds the email there.
    at = now.astimezone(UTC)
    for _ in range(_STEPS):
        if at - now > _HORIZON:
            break
        if quiet is not None and (end := quiet_until(quiet, email.timezone, at)) is not None:
            at = end
        elif not _open(window, _wall(at, zone)):
            at = _next_opening(window, zone, at)
        elif at == now:
            return None
        elif at == window_opens(window, email.timezone, now):
            return at, f"its send window ({described})"
        elif at == quiet_end:
            return at, quiet_reason
        else:
            return at, f"the end of quiet hours and its send window ({described})"
    # Every opening is quiet: wait for the next one, so the mistake shows and nothing goes out at night.
    opening = _next_opening(window, zone, now.astimezone(UTC))
    return opening, f"its send window ({described}), which lies inside quiet hours"


def decide(
    due: Sequence[DueEmail],
    *,
    policy: ContactPolicy,
    recent_sends: Mapping[int, Iterable[datetime]],
    now: datetime,
) -> dict[int, tuple[datetime, str] | None]:
    """For each due email: None to send now, or (until when it waits, why).

    ``recent_sends`` are the times emails were sent to each lead within the
    frequency cap's period. An email held by quiet hours or its send window does
    not count against the cap: it could not use a slot now anyway.
    """
    decisions: dict[int, tuple[datetime, str] | None] = {}
    by_lead: dict[int, list[DueEmail]] = {}
    for email in due:
        by_lead.setdefault(email.lead_id, []).append(email)
    for lead_id, emails in by_lead.items():
        emails.sort(key=lambda e: (e.priority, e.due_at, e.message_id))
        ready: list[DueEmail] = []
        for email in emails:
            hold = _hold(email, policy.quiet_hours, now)
            if hold is None:
                ready.append(email)
            else:
                decisions[email.message_id] = hold
        cap = policy.frequency_cap
        if cap is None:
            decisions.update(dict.fromkeys((e.message_id for e in ready), None))
            continue
        window_start = now - cap.per
        sent = sorted(t for t in recent_sends.get(lead_id, ()) if t > window_start)
        for email in ready:
            if len(sent) < cap.max_messages:
                decisions[email.message_id] = None
                sent.append(now)
                sent.sort()
            else:
                # A slot frees when the oldest email in the window leaves it.
                frees = sent[len(sent) - cap.max_messages] + cap.per
                decisions[email.message_id] = (frees, f"the frequency cap ({cap.max_messages} per {cap.per})")
    return decisions
