"""Whole-database chores: counting what is there and starting clean (the demo)."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from db.models import Enrollment, Event, Lead, Message, ScoreChange, StageTransition, Suppression

# Children first, so foreign keys hold at every step.
_TABLES = (Message, Enrollment, StageTransition, ScoreChange, Event, Suppression, Lead)


def row_counts(*, session: Session) -> dict[str, int]:
    return {t.__tablename__: int(session.scalar(select(func.count()).select_from(t)) or 0) for t in _TABLES}


def delete_everything(*, session: Session) -> dict[str, int]:
    """Remove every lead and all its history; returns what was there."""
    counts = row_counts(session=session)
    for table in _TABLES:
        session.execute(delete(table))
    return counts
