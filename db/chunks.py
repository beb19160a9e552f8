"""Disjoint lead-id ranges: how a cycle or a replay splits its leads into chunks before scoring them.

The split is one set-based query: the ids in order, numbered by a window
(``row_number()``), cut every ``size`` ids; each cut becomes a range
``lo..hi`` (both ends included). Ranges never overlap by construction, so
chunks can run at the same time, in threads or on several workers; each chunk
still locks its leads (``lock_leads``) as a safety net against any other
writer. A chunk then reads its leads back with :func:`candidates_in_range` or
:func:`leads_in_range`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import candidate_ids
from db.models import Lead


@dataclass(frozen=True)
class LeadRange:
    """The lead ids ``lo..hi`` (inclusive) of one chunk, and how many leads it held when the range was cut."""

    lo: int
    hi: int
    leads: int


def _cut(session: Session, ids: Any, size: int) -> list[LeadRange]:
    """``ids`` (a subquery with column ``id``) in order, cut every ``size`` ids into ranges."""
    if size < 1:
        raise ValueError(f"a chunk holds at least one lead, not {size}")
    numbered = select(
        ids.c.id.label("id"),
        ((func.row_number().over(order_by=ids.c.id) - 1) // size).label("bucket"),
    ).subquery()
    query = (
        select(func.min(numbered.c.id), func.max(numbered.c.id), func.count())
        .group_by(numbered.c.bucket)
        .order_by(numbered.c.bucket)
    )
    return [LeadRange(int(lo), int(hi), int(n)) for lo, hi, n in session.execute(query)]


def candidate_ranges(*, session: Session, now: datetime, size: int) -> list[LeadRange]:
    """The leads a cycle at ``now`` must look at, cut into ranges of at most ``size`` of them.

    There are ``ceil(candidates / size)`` ranges. A lead that becomes a candidate after the cut
    is scored by this cycle only if its id falls in a range whose chunk has not read its leads yet;
    otherwise it waits for the next cycle.
    """
    return _cut(session, candidate_ids(now), size)


def lead_ranges(*, session: Session, size: int) -> list[LeadRange]:
    """Every lead, cut into ranges of at most ``size`` leads (for a replay: ``ceil(leads / size)`` ranges)."""
    return _cut(session, select(col(Lead.id).label("id")).subquery(), size)


def candidates_in_range(*, session: Session, now: datetime, lo: int, hi: int) -> list[int]:
    """The ids of the leads a cycle at ``now`` must look at, among ``lo..hi``, in order."""
    candidates = candidate_ids(now, lo=lo, hi=hi)
    query = select(candidates.c.id).order_by(candidates.c.id)
    return [int(i) for i in session.scalars(query)]


def leads_in_range(*, session: Session, lo: int, hi: int) -> list[int]:
    """The ids of every lead among ``lo..hi``, in order (a replay's chunk)."""
    query = select(col(Lead.id)).where(col(Lead.id).between(lo, hi)).order_by(col(Lead.id))
    return [int(i) for i in session.scalars(query) if i is not None]
