"""The playbook's engagement scoring compiled to SQL: a chunk's decayed, capped event points in one statement.

:mod:`nurture.scoring` is the reference: every event of a scored kind adds
``points · 2^(−age / half_life)`` at ``now``, and of a kind with ``max_per_day`` only
the first events of each UTC day count. Here the same sum is one ``SELECT`` per chunk
(a window function numbers each lead's events per kind and day), so a replay of every
event reads them in the database instead of as Python objects. A property test
(tests/db/test_scoring_sql.py) checks both agree to 1e-9 on SQLite and PostgreSQL.

Ages are counted exactly on both engines: PostgreSQL's ``EXTRACT(EPOCH ...)`` is exact;
on SQLite (naive UTC text, microseconds included) whole seconds come from
``strftime('%s')`` and the microseconds from the text, since ``julianday`` would lose
tens of microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Float, Integer, bindparam, case, cast, func, literal, select
from sqlalchemy.orm import Session
from sqlmodel import col

from db.models import Event, UTCDateTime
from nurture.playbook import Playbook

# Events beyond this many per kind and day are never a cap (kinds without max_per_day).
_UNCAPPED = 2**62
# Past 900 half-lives nothing is left worth counting (2^-900 < 1e-270): 0, as PostgreSQL's power() and
# products would raise an underflow error where Python returns a denormal or 0 (points are 0 or ≥ 1e-6).
_NOTHING_LEFT = 900.0


@dataclass(frozen=True, slots=True)
class KindPoints:
    """One lead's events of one kind up to ``now``: how many, and the decayed points of those counted."""

    lead_id: int
    kind: str
    events: int
    points: float


def _age_seconds(dialect: str, occurred: Any, now: Any) -> Any:
    """Seconds from ``occurred`` to ``now``, exactly (to the microsecond) on both engines."""
    if dialect == "postgresql":
        return cast(func.extract("epoch", now - occurred), Float)
    # Whole seconds of the text without its fraction: strftime rounds to milliseconds first, so
    # "09:00:00.999999" would count as 09:00:01.
    whole = cast(func.strftime("%s", func.substr(now, 1, 19)), Integer) - cast(
        func.strftime("%s", func.substr(occurred, 1, 19)), Integer
    )
    micros = cast(func.substr(now, 21, 6), Integer) - cast(func.substr(occurred, 21, 6), Integer)
    return whole + micros / 1_000_000.0


def _utc_day(dialect: str, occurred: Any) -> Any:
    """The UTC day a daily cap counts in (``nurture.scoring.day_key``)."""
    if dialect == "postgresql":
        return func.date(func.timezone("UTC", occurred))
    return func.substr(occurred, 1, 10)


def chunk_points(*, session: Session, lead_ids: Sequence[int], playbook: Playbook, now: datetime) -> list[KindPoints]:
    """Every event up to ``now`` of the chunk's leads, summed per lead and kind: scored kinds with
    their decayed, capped points, and the kinds that make a customer (counted, for the stage).

    One statement; the rows are one per (lead, kind), not one per event.
    """
    scoring = playbook.scoring
    kinds = sorted(set(scoring.events) | set(playbook.stages.customer.on_events))
    if not lead_ids or not kinds:
        return []
    dialect = session.get_bind().dialect.name
    at = bindparam("now", now, type_=UTCDateTime())
    occurred = col(Event.occurred_at)
    ranked = (
        select(
            col(Event.lead_id).label("lead_id"),
            col(Event.kind).label("kind"),
            _age_seconds(dialect, occurred, at).label("age"),
            func.row_number()
            .over(
                partition_by=(col(Event.lead_id), col(Event.kind), _utc_day(dialect, occurred)),
                order_by=(occurred, col(Event.id)),
            )
            .label("nth"),
        )
        # A range, not an IN list: a replay's chunk is every lead between its first and last id (others
        # in the range are dropped below), and may hold more leads than an IN list may bind.
        .where(col(Event.lead_id).between(min(lead_ids), max(lead_ids)), occurred <= at, col(Event.kind).in_(kinds))
        .subquery()
    )
    points = {kind: rule.points for kind, rule in scoring.events.items()}
    caps = {kind: rule.max_per_day for kind, rule in scoring.events.items() if rule.max_per_day is not None}
    half_lives = ranked.c.age / scoring.half_life.total_seconds()
    decay = case((half_lives > _NOTHING_LEFT, literal(0.0)), else_=func.power(literal(2.0), -half_lives))
    each = case(points, value=ranked.c.kind, else_=literal(0.0)) * decay
    cap = case(caps, value=ranked.c.kind, else_=literal(_UNCAPPED)) if caps else literal(_UNCAPPED)
    query = (
        select(
            ranked.c.lead_id,
            ranked.c.kind,
            func.count(),
            func.coalesce(func.sum(case((ranked.c.nth <= cap, each), else_=literal(0.0))), 0.0),
        )
        .group_by(ranked.c.lead_id, ranked.c.kind)
        .order_by(ranked.c.lead_id, ranked.c.kind)
    )
    wanted = set(lead_ids)
    return [
        KindPoints(int(lead), str(kind), int(n), float(total))
        for lead, kind, n, total in session.execute(query)
        if int(lead) in wanted
    ]
