"""Reads for ``nurture simulate``: leads with their whole history, and the live enrollments, a batch at a time.

Nothing here writes. The engine a simulation reads through cannot write either: a SQLite
file opened read-only, a PostgreSQL session whose transactions are read-only. Each batch
of leads is four queries (leads, events, the messages their opens and clicks were about,
suppressions) and one for its active enrollments, whatever the batch's size.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, case, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import CLICK, OPEN, PROFILE_COLUMNS, batched
from db.models import Enrollment, Event, Lead, Message, Suppression
from nurture.errors import ConfigurationError
from nurture.history import LeadHistory, LiveEnrollment, PastEvent
from nurture.playbook import Stage
from nurture.privacy import email_hash
from nurture.scoring import LeadScoreState
from nurture.sequences import Branch, EnrollmentState


def read_only_engine(url: str) -> Engine:
    """An engine that cannot change the database: ``mode=ro`` for a SQLite file, read-only transactions
    on PostgreSQL. A transaction reads one snapshot of the database (a deferred ``BEGIN`` in WAL mode;
    ``REPEATABLE READ``) and takes no write lock, so a simulation never holds up the cycle."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not path.is_file():
            raise ConfigurationError(f"there is no database at {path}: nothing to simulate (run `nurture db upgrade`)")
        engine = create_engine(
            f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&uri=true",
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        # The driver would begin no transaction for reads: begin one, so every batch sees the same snapshot.
        event.listen(
            engine, "connect", lambda dbapi_connection, _record: setattr(dbapi_connection, "isolation_level", None)
        )
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        return engine
    engine = create_engine(url, pool_pre_ping=True, isolation_level="REPEATABLE READ")

    @event.listens_for(engine, "connect")
    def _read_only(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        cursor.close()
        dbapi_connection.commit()

    return engine


def _message_id(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def lead_histories(*, session: Session, lead_ids: Sequence[int], now: datetime) -> list[LeadHistory]:
    """The leads with these ids, each with its events up to ``now`` (oldest first), in id order."""
    if not lead_ids:
        return []
    ids = sorted(set(lead_ids))
    leads: list[Any] = []
    steps: dict[int, tuple[str, str]] = {}
    events: dict[int, list[PastEvent]] = defaultdict(list)
    suppressed: dict[str, datetime] = {}
    for chunk in batched(ids):
        leads.extend(
            session.execute(
                select(
                    col(Lead.id),
                    *(getattr(Lead, c) for c in PROFILE_COLUMNS),
                    col(Lead.created_at),
                    col(Lead.stage),
                    col(Lead.fit_score),
                    col(Lead.engagement),
                    col(Lead.scored_at),
                    col(Lead.score),
                ).where(col(Lead.id).in_(chunk))
            )
        )
        for mid, sequence, step_id in session.execute(
            select(col(Message.id), col(Message.sequence), col(Message.step_id)).where(col(Message.lead_id).in_(chunk))
        ):
            steps[int(mid)] = (sequence, step_id)
        # Properties are read only for opens and clicks: which email they were about.
        about = case((col(Event.kind).in_([OPEN, CLICK]), col(Event.properties)), else_=None)
        query = (
            select(col(Event.lead_id), col(Event.kind), col(Event.occurred_at), about)
            .where(col(Event.lead_id).in_(chunk), col(Event.occurred_at) <= now)
            .order_by(col(Event.lead_id), col(Event.occurred_at), col(Event.id))
        )
        for lead_id, kind, occurred_at, properties in session.execute(query):
            message = _message_id((properties or {}).get("nurture_message_id")) if properties else None
            events[int(lead_id)].append(PastEvent(kind, occurred_at, steps.get(message) if message else None))
    hashes = {email_hash(row.email): row.email for row in leads}
    for chunk in batched(sorted(hashes)):
        for hashed, at in session.execute(
            select(col(Suppression.email_hash), col(Suppression.at)).where(col(Suppression.email_hash).in_(chunk))
        ):
            suppressed[hashes[hashed]] = at
    return [
        LeadHistory(
            id=int(row.id),
            email=row.email,
            profile={c: getattr(row, c) for c in PROFILE_COLUMNS},
            timezone=row.timezone or "UTC",
            created_at=row.created_at,
            events=tuple(events.get(int(row.id), ())),
            live_stage=Stage(row.stage),
            live_score=LeadScoreState(row.fit_score, row.engagement, row.scored_at, row.score),
            suppressed_since=suppressed.get(row.email),
        )
        for row in sorted(leads, key=lambda r: int(r.id))
    ]


def live_enrollments(*, session: Session, lead_ids: Sequence[int]) -> list[LiveEnrollment]:
    """The active enrollments of these leads, with each lead's address."""
    found: list[LiveEnrollment] = []
    for chunk in batched(sorted(set(lead_ids))):
        query = (
            select(
                col(Enrollment.id),
                col(Enrollment.lead_id),
                col(Lead.email),
                col(Enrollment.sequence),
                col(Enrollment.stage),
                col(Enrollment.steps_done),
                col(Enrollment.branches),
                col(Enrollment.next_due_at),
            )
            .join(Lead, col(Lead.id) == col(Enrollment.lead_id))
            .where(col(Enrollment.lead_id).in_(chunk), col(Enrollment.state) == EnrollmentState.active)
            .order_by(col(Enrollment.id))
        )
        found.extend(
            LiveEnrollment(
                id=int(row.id),
                lead_id=int(row.lead_id),
                email=row.email,
                sequence=row.sequence,
                stage=Stage(row.stage),
                steps_done=tuple(row.steps_done or ()),
                branches=tuple(Branch.from_json(b) for b in row.branches or ()),
                next_due_at=row.next_due_at,
            )
            for row in session.execute(query)
        )
    return found
