"""Set-based counts behind `nurture report`: what became of the emails each step sent.

One grouped query does the bulk of the work: the period's emails joined to one row per
email of what its events say (opened, clicked, bounced, unsubscribed …), summed per
sequence, step and variant. It reads each event of the period once, from the index on the
email it is about (which holds the kind and time too, so the table itself is not read).
Page unsubscribes and conversions are rare, so they are found from their side (an
unsubscribe, a converted enrollment, a move up) to the emails before them: each of those
queries names its rare rows in an ``IN (subquery)``, which both engines run first, instead
of visiting every email of the period. The window arithmetic is done on those few rows in
Python, the same on SQLite and PostgreSQL. docs/benchmarks.md measures it at a million
emails. This module counts; ``nurture.reporting`` orders, rates and judges.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from db.cycle import CLICK, OPEN
from db.funnel_history import stages_by_day
from db.models import Enrollment, Event, Lead, Message, StageTransition, Suppression
from db.suppressions import LINK_SOURCE
from nurture.delivery import MessageStatus
from nurture.inbound import MACHINE_OPEN
from nurture.playbook import Playbook, Stage
from nurture.reporting import Report, StepCounts, build_report, describe_duration

# An unsubscribe made on nurture's own page (a link in the email): credited to the last email before it.
PAGE_SOURCES = (LINK_SOURCE, "expired link")
# Stages a lead "converts" to when its sequence has no goal: up to one of these, above where it enrolled.
CONVERTING_STAGES = (Stage.hot.value, Stage.customer.value)
RANK = {stage.value: rank for rank, stage in enumerate(Stage)}

_E = Event.__table__  # type: ignore[attr-defined]
_M = Message.__table__  # type: ignore[attr-defined]
_N = Enrollment.__table__  # type: ignore[attr-defined]
_T = StageTransition.__table__  # type: ignore[attr-defined]
_L = Lead.__table__  # type: ignore[attr-defined]
_S = Suppression.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Period:
    """Emails sent from ``since`` to ``until``, both included (a cycle reports the emails it just sent)."""

    since: datetime
    until: datetime


def _flag(kind: str | tuple[str, ...]) -> Any:
    kinds = (kind,) if isinstance(kind, str) else kind
    return func.max(case((_E.c.kind.in_(kinds), 1), else_=0))


def _sent_in(period: Period, sequence: str | None) -> list[Any]:
    where = [_M.c.sent_at.is_not(None), _M.c.sent_at >= period.since, _M.c.sent_at <= period.until]
    if sequence is not None:
        where.append(_M.c.sequence == sequence)
    return where


def step_counts(
    *,
    session: Session,
    period: Period,
    sequence: str | None = None,
    conversion_window: timedelta,
    goals: Mapping[str, Collection[str]],
) -> list[StepCounts]:
    """Per sequence, step and variant: the period's emails and what became of them."""
    # The first and last id of the period's emails bound the events read to the index's range of
    # those emails: a day's report reads a day's events, not every event since that day's first email.
    # (With count(*) beside them, PostgreSQL reads the period's emails from the sent_at index instead of
    # walking the primary key from its first id until an email of the period turns up.)
    emails, first, last = session.execute(
        select(func.count(), func.min(_M.c.id), func.max(_M.c.id)).where(*_sent_in(period, sequence))
    ).one()
    if not emails:
        return []
    flags = (
        select(
            _E.c.message_id.label("message_id"),
            _flag(OPEN).label("opened"),
            _flag(MACHINE_OPEN).label("machine_opened"),
            _flag(CLICK).label("clicked"),
            _flag("bounce").label("bounced"),
            _flag("spamreport").label("spam"),
            _flag("unsubscribe").label("unsubscribed"),
        )
        # An event cannot come before its email: the period's start bounds the events read too.
        .where(
            _E.c.message_id.is_not(None),
            _E.c.message_id >= first,
            _E.c.message_id <= last,
            _E.c.occurred_at >= period.since,
        )
        .group_by(_E.c.message_id)
        .subquery()
    )
    bounced = or_(
        flags.c.bounced == 1,
        and_(_M.c.status == MessageStatus.failed.value, _M.c.last_error.like("bounce:%")),
    )
    query = (
        select(
            _M.c.sequence,
            _M.c.step_id,
            _M.c.variant,
            func.count().label("sent"),
            func.count(_M.c.delivered_at).label("delivered"),
            func.coalesce(func.sum(flags.c.opened), 0),
            func.coalesce(func.sum(flags.c.machine_opened), 0),
            func.coalesce(func.sum(flags.c.clicked), 0),
            func.sum(case((bounced, 1), else_=0)),
            func.coalesce(func.sum(flags.c.spam), 0),
            func.coalesce(func.sum(flags.c.unsubscribed), 0),
        )
        .select_from(_M.outerjoin(flags, flags.c.message_id == _M.c.id))
        .where(*_sent_in(period, sequence))
        .group_by(_M.c.sequence, _M.c.step_id, _M.c.variant)
    )
    keyed: dict[tuple[str, str, str | None], dict[str, int]] = {}
    for seq, step, variant, sent, delivered, opened, machine, clicked, bounce, spam, unsub in session.execute(query):
        keyed[(seq, step, variant)] = {
            "sent": int(sent),
            "delivered": int(delivered),
            "opened": int(opened),
            "machine_opened": int(machine),
            "clicked": int(clicked),
            "bounced": int(bounce),
            "spam": int(spam),
            "unsubscribed": int(unsub),
            "converted": 0,
        }
    # SendGrid's unsubscribes are counted above; an unsubscribe on nurture's page names no email.
    for key in _keys_of(session, page_unsubscribed_emails(session=session, period=period, sequence=sequence)):
        keyed[key]["unsubscribed"] += 1
    converted = converted_emails(
        session=session, period=period, sequence=sequence, window=conversion_window, goals=goals
    )
    for key in _keys_of(session, converted):
        keyed[key]["converted"] += 1
    return [StepCounts(seq, step, variant, **numbers) for (seq, step, variant), numbers in keyed.items()]


def _keys_of(session: Session, message_ids: Collection[int]) -> Iterable[tuple[str, str, str | None]]:
    """The (sequence, step, variant) of each of a few emails."""
    ids = sorted(message_ids)
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        query = select(_M.c.sequence, _M.c.step_id, _M.c.variant).where(_M.c.id.in_(chunk))
        yield from session.execute(query)  # type: ignore[misc]


def page_unsubscribed_emails(*, session: Session, period: Period, sequence: str | None) -> set[int]:
    """The period's emails unsubscribed from on nurture's own page: the last email the lead got before
    the unsubscribe, unless SendGrid's unsubscribe event names that email already (counted with the events)."""
    pages = (
        select(_M.c.id, _M.c.lead_id, _M.c.sent_at)
        .join(_L, _L.c.id == _M.c.lead_id)
        .join(_S, _S.c.email == _L.c.email)
        .where(
            _S.c.reason == "unsubscribe",
            _S.c.source.in_(PAGE_SOURCES),
            _S.c.at >= period.since,
            _M.c.sent_at <= _S.c.at,
            *_sent_in(period, None),
        )
    )
    last: dict[int, tuple[datetime, int]] = {}
    for message_id, lead_id, sent_at in session.execute(pages):
        if lead_id not in last or sent_at > last[lead_id][0]:
            last[lead_id] = (sent_at, int(message_id))
    found = {message_id for _, message_id in last.values()}
    ids = sorted(found)
    for start in range(0, len(ids), 5000):
        named = select(_E.c.message_id).where(
            _E.c.message_id.in_(ids[start : start + 5000]),
            _E.c.kind == "unsubscribe",
            _E.c.occurred_at >= period.since,
        )
        found -= {int(row[0]) for row in session.execute(named)}
    if sequence is not None and found:
        found &= set(_in_sequence(session, found, sequence))
    return found


def _in_sequence(session: Session, message_ids: Collection[int], sequence: str) -> list[int]:
    ids = sorted(message_ids)
    return [
        int(row[0])
        for start in range(0, len(ids), 5000)
        for row in session.execute(
            select(_M.c.id).where(_M.c.id.in_(ids[start : start + 5000]), _M.c.sequence == sequence)
        )
    ]


def converted_emails(
    *,
    session: Session,
    period: Period,
    sequence: str | None,
    window: timedelta,
    goals: Mapping[str, Collection[str]],
) -> set[int]:
    """The period's emails followed, within ``window``, by their lead converting: one of the sequence's
    goal events (``goals``: sequence → event kinds), even after the enrollment ended; for a sequence
    without a goal, the lead moving up to hot or customer, above the stage it enrolled at."""
    found: set[int] = set()
    for name, kinds in sorted(goals.items()):
        if sequence is not None and name != sequence:
            continue
        # The leads that did a goal event in the period, named first: a few, where the period's emails are many.
        reachers = select(_E.c.lead_id).where(_E.c.kind.in_(sorted(kinds)), _E.c.occurred_at >= period.since)
        reached = (
            select(_M.c.id, _M.c.sent_at, _E.c.occurred_at)
            .join(_E, _E.c.lead_id == _M.c.lead_id)
            .where(
                _M.c.lead_id.in_(reachers),
                _E.c.kind.in_(sorted(kinds)),
                _E.c.occurred_at > _M.c.sent_at,
                _E.c.occurred_at >= period.since,
                *_sent_in(period, name),
            )
        )
        found |= {int(m) for m, sent_at, at in session.execute(reached) if at - sent_at <= window}
    moves = (
        select(_M.c.id, _M.c.sent_at, _N.c.stage, _T.c.to_stage, _T.c.at)
        .join(_N, _N.c.id == _M.c.enrollment_id)
        .join(_T, _T.c.lead_id == _M.c.lead_id)
        .where(
            _T.c.to_stage.in_(CONVERTING_STAGES),
            _T.c.at > _M.c.sent_at,
            _T.c.at >= period.since,
            *_sent_in(period, sequence),
        )
    )
    # The rarer side named first, as for the goals above: the enrollments of the sequences without
    # a goal (most emails belong to the ones with a goal), else the leads that moved up in the period.
    if goals:
        others = select(_N.c.id).where(_N.c.sequence.not_in(sorted(goals)))
        moves = moves.where(_M.c.enrollment_id.in_(others), _M.c.sequence.not_in(sorted(goals)))
    else:
        moved = select(_T.c.lead_id).where(_T.c.to_stage.in_(CONVERTING_STAGES), _T.c.at >= period.since)
        moves = moves.where(_M.c.lead_id.in_(moved))
    for message_id, sent_at, enrolled_stage, to_stage, at in session.execute(moves):
        if RANK[to_stage] > RANK.get(enrolled_stage, 0) and at - sent_at <= window:
            found.add(int(message_id))
    return found


@dataclass(frozen=True, slots=True)
class SequenceConversion:
    """Enrollments started in the period, and those that converted within the window."""

    sequence: str
    enrolled: int
    converted: int


def sequence_conversions(
    *,
    session: Session,
    period: Period,
    window: timedelta,
    goals: Mapping[str, Collection[str]],
) -> list[SequenceConversion]:
    """Per sequence: enrollments started in the period and how many converted within ``window`` of
    starting (a goal event; for a sequence without a goal, a move up to hot or customer)."""
    started = [_N.c.started_at >= period.since, _N.c.started_at <= period.until]
    enrolled = {
        seq: int(n)
        for seq, n in session.execute(
            select(_N.c.sequence, func.count()).where(*started).group_by(_N.c.sequence).order_by(_N.c.sequence)
        )
    }
    converted: dict[str, set[int]] = {}
    for name, kinds in sorted(goals.items()):
        reachers = select(_E.c.lead_id).where(_E.c.kind.in_(sorted(kinds)), _E.c.occurred_at >= period.since)
        reached = (
            select(_N.c.id, _N.c.started_at, _E.c.occurred_at)
            .join(_E, _E.c.lead_id == _N.c.lead_id)
            .where(
                _N.c.lead_id.in_(reachers),
                _N.c.sequence == name,
                _E.c.kind.in_(sorted(kinds)),
                _E.c.occurred_at > _N.c.started_at,
                *started,
            )
        )
        for enrollment_id, started_at, at in session.execute(reached):
            if at - started_at <= window:
                converted.setdefault(name, set()).add(int(enrollment_id))
    moves = (
        select(_N.c.id, _N.c.sequence, _N.c.stage, _N.c.started_at, _T.c.to_stage, _T.c.at)
        .join(_T, and_(_T.c.lead_id == _N.c.lead_id, _T.c.at > _N.c.started_at))
        .where(_T.c.to_stage.in_(CONVERTING_STAGES), *started)
    )
    if goals:
        moves = moves.where(_N.c.sequence.not_in(sorted(goals)))
    for enrollment_id, seq, stage, started_at, to_stage, at in session.execute(moves):
        if RANK[to_stage] > RANK.get(stage, 0) and at - started_at <= window:
            converted.setdefault(seq, set()).add(int(enrollment_id))
    return [SequenceConversion(seq, n, len(converted.get(seq, ()))) for seq, n in enrolled.items()]


def goals_of(playbook: Playbook | None) -> dict[str, tuple[str, ...]]:
    """Each sequence with a goal, and the event kinds that reach it."""
    if playbook is None:
        return {}
    return {name: s.goal.events for name, s in playbook.sequences.items() if s.goal is not None}


def sequence_report(
    *,
    session: Session,
    playbook: Playbook | None,
    period: Period,
    conversion_window: timedelta,
    sequence: str | None = None,
    metric: str | None = None,
) -> Report:
    """The report of the period's emails, in the playbook's order, with its split-test verdicts."""
    counts = step_counts(
        session=session,
        period=period,
        sequence=sequence,
        conversion_window=conversion_window,
        goals=goals_of(playbook),
    )
    return build_report(
        counts,
        playbook=playbook,
        metric=metric,
        period={
            "since": period.since.isoformat(timespec="minutes"),
            "until": period.until.isoformat(timespec="minutes"),
            "conversion_window": describe_duration(conversion_window),
        },
    )


def chart_data(
    *, session: Session, playbook: Playbook | None, period: Period, window: timedelta
) -> tuple[list[date], dict[str, list[int]], list[SequenceConversion]]:
    """What the report's charts draw: leads per stage each day of the period, and each sequence's
    enrollments of the period with their conversions, in playbook order."""
    days, stages = stages_by_day(session=session, start=period.since.date(), end=period.until.date())
    conversions = sequence_conversions(session=session, period=period, window=window, goals=goals_of(playbook))
    order = list(playbook.sequences) if playbook is not None else []
    present = {c.sequence: c for c in conversions}
    ordered = [present.pop(name, SequenceConversion(name, 0, 0)) for name in order]
    return days, stages, ordered + sorted(present.values(), key=lambda c: c.sequence)
