"""The contact policy: whether a due email may go out now, or when it may.

Applied when an email becomes due (not when it was queued), so a lead who moved
to another time zone, or who received other emails meanwhile, is judged as
things are now. Quiet hours are the lead's own night; the frequency cap counts
every email sent to the lead across sequences, and when it bites the sequence
with the lowest ``priority`` number goes first.

Pure: no clock, no database.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nurture.playbook import ContactPolicy, QuietHours


@dataclass(frozen=True, slots=True)
class DueEmail:
    message_id: int
    lead_id: int
    priority: int
    due_at: datetime
    timezone: str


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def quiet_until(quiet: QuietHours, timezone: str, now: datetime) -> datetime | None:
    """When the lead's quiet hours end, if ``now`` falls inside them; else None."""
    zone = _zone(timezone)
    local = now.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    # A window that spans midnight (21:00 → 08:00) is the part outside end → start.
    spans_midnight = quiet.start > quiet.end
    inside = (clock >= quiet.start or clock < quiet.end) if spans_midnight else quiet.start <= clock < quiet.end
    if not inside:
        return None
    end = local.replace(hour=quiet.end.hour, minute=quiet.end.minute, second=0, microsecond=0)
    if end <= local:
        end = (local + timedelta(days=1)).replace(hour=quiet.end.hour, minute=quiet.end.minute, second=0, microsecond=0)
    # Rebuild from the wall-clock time so a daylight-saving change lands on the right hour.
    return datetime.combine(end.date(), end.time(), tzinfo=zone).astimezone(UTC)


def decide(
    due: Sequence[DueEmail],
    *,
    policy: ContactPolicy,
    recent_sends: Mapping[int, Iterable[datetime]],
    now: datetime,
) -> dict[int, tuple[datetime, str] | None]:
    """For each due email: None to send now, or (until when it waits, why).

    ``recent_sends`` are the times emails were sent to each lead within the
    frequency cap's period.
    """
    decisions: dict[int, tuple[datetime, str] | None] = {}
    by_lead: dict[int, list[DueEmail]] = {}
    for email in due:
        by_lead.setdefault(email.lead_id, []).append(email)
    for lead_id, emails in by_lead.items():
        emails.sort(key=lambda e: (e.priority, e.due_at, e.message_id))
        wait = quiet_until(policy.quiet_hours, emails[0].timezone, now) if policy.quiet_hours else None
        if wait is not None:
            reason = f"the end of quiet hours ({emails[0].timezone})"
            decisions.update(dict.fromkeys((e.message_id for e in emails), (wait, reason)))
            continue
        cap = policy.frequency_cap
        if cap is None:
            decisions.update(dict.fromkeys((e.message_id for e in emails), None))
            continue
        window_start = now - cap.per
        sent = sorted(t for t in recent_sends.get(lead_id, ()) if t > window_start)
        for email in emails:
            if len(sent) < cap.max_messages:
                decisions[email.message_id] = None
                sent.append(now)
                sent.sort()
            else:
                # A slot frees when the oldest email in the window leaves it.
                frees = sent[len(sent) - cap.max_messages] + cap.per
                decisions[email.message_id] = (frees, f"the frequency cap ({cap.max_messages} per {cap.per})")
    return decisions
