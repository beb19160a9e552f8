"""The funnel over time: how many leads were in each stage at the end of each UTC day.

A lead's stage at any moment follows from its transitions: before the first one it is in
that transition's ``from_stage`` (cold, since leads are created cold), from then on in the
``to_stage`` of its latest transition. A lead with no transition is in its ``stage``. It is
counted from its ``created_at`` (or its first transition, should that be earlier).

So the history is a running sum of moves: +1 into a stage when a lead appears, and for
each transition +1 into its target and −1 out of the stage the lead was in (the previous
transition's target, read with ``LAG``, so the counts stay consistent even if a row's
``from_stage`` disagrees). ONE query sums the moves per UTC day and stage; Python adds the
days up. The work grows with the number of transitions and leads, never with leads × days.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import case, func, literal, select, union_all
from sqlalchemy.orm import Session
from sqlmodel import col

from db.models import Lead, StageTransition
from nurture.playbook import Stage


def _utc_day(dialect: str, at: Any) -> Any:
    """The UTC calendar day of a stored time (SQLite keeps naive UTC text, PostgreSQL ``timestamptz``)."""
    if dialect == "postgresql":
        return func.date(func.timezone("UTC", at))
    return func.substr(at, 1, 10)


def stages_by_day(*, session: Session, start: date, end: date) -> tuple[list[date], dict[str, list[int]]]:
    """Every day from ``start`` to ``end`` (inclusive), and for each stage (coldest first) the number
    of leads in it at the end of each of those days, in UTC."""
    if end < start:
        raise ValueError(f"the range ends ({end}) before it starts ({start})")
    until = datetime.combine(end + timedelta(days=1), time(), tzinfo=UTC)
    dialect = session.get_bind().dialect.name
    to_stage = col(StageTransition.to_stage)
    window: dict[str, Any] = {
        "partition_by": col(StageTransition.lead_id),
        "order_by": (col(StageTransition.at), col(StageTransition.id)),
    }
    ordered = select(
        col(StageTransition.lead_id),
        col(StageTransition.at),
        col(StageTransition.from_stage),
        to_stage,
        func.lag(to_stage).over(**window).label("previous"),
        func.row_number().over(**window).label("n"),
    ).cte("ordered")
    created_at = col(Lead.created_at)
    appeared = case((ordered.c.at < created_at, ordered.c.at), else_=created_at)
    moves = union_all(
        select(ordered.c.at, ordered.c.to_stage.label("stage"), literal(1).label("delta")).where(ordered.c.at < until),
        select(ordered.c.at, func.coalesce(ordered.c.previous, ordered.c.from_stage), literal(-1)).where(
            ordered.c.at < until
        ),
        select(appeared, func.coalesce(ordered.c.from_stage, col(Lead.stage)), literal(1))
        .select_from(Lead)
        .outerjoin(ordered, (ordered.c.lead_id == col(Lead.id)) & (ordered.c.n == 1))
        .where(appeared < until),
    ).subquery("moves")
    day = _utc_day(dialect, moves.c.at)
    rows = session.execute(select(day, moves.c.stage, func.sum(moves.c.delta)).group_by(day, moves.c.stage)).all()

    names = [s.value for s in Stage]
    names += sorted({str(stage) for _, stage, _ in rows} - set(names))
    running = dict.fromkeys(names, 0)
    changes: dict[date, dict[str, int]] = defaultdict(lambda: dict.fromkeys(names, 0))
    for raw_day, stage, delta in rows:
        when = raw_day if isinstance(raw_day, date) else date.fromisoformat(str(raw_day))
        if when < start:
            running[str(stage)] += int(delta)
        else:
            changes[when][str(stage)] += int(delta)
    days = [start + timedelta(days=k) for k in range((end - start).days + 1)]
    series: dict[str, list[int]] = {name: [] for name in names}
    for when in days:
        for name, delta in changes.get(when, {}).items():
            running[name] += delta
        for name in names:
            series[name].append(running[name])
    return days, series
