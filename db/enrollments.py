"""What operators see of enrollments and sequences, and the few writes they make by hand.

Listing enrollments, ending some of them, pausing and resuming a sequence. Loads
and writes only: which enrollments an operator means, and what to tell them, is
the CLI's business. A pause is only a row here; the cycle and the dispatcher read
it (``db.cycle.paused_sequences``) and leave the sequence alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import batched, end_enrollments
from db.engine import dialect_insert
from db.models import Enrollment, Event, Lead, Message, SequencePause, is_pending
from nurture.delivery import MessageStatus
from nurture.sequences import EnrollmentState


@dataclass(frozen=True, slots=True)
class StepInFlight:
    """The message of the last step an enrollment took, while the enrollment waits for it to settle."""

    step_id: str
    message_id: int
    status: str


@dataclass(frozen=True, slots=True)
class EnrollmentRow:
    """An enrollment as an operator reads it: whose, where it is, and what it waits for."""

    id: int
    email: str
    sequence: str
    stage: str
    state: str
    started_at: datetime
    steps_done: tuple[str, ...]
    next_due_at: datetime | None
    exit_reason: str | None
    ended_at: datetime | None
    in_flight: StepInFlight | None
    # While it waits on a wait_for: the deadline (the lead's next event may end the wait sooner).
    waiting_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class EnrollmentSelection:
    """Which enrollments an operator means: by id, or by lead (and sequence), in some states."""

    # Empty: any state.
    states: tuple[EnrollmentState, ...] = (EnrollmentState.active,)
    ids: tuple[int, ...] = ()
    email: str | None = None
    sequence: str | None = None
    # The enrollments one stage change started.
    transition_id: int | None = None

    def conditions(self) -> list[Any]:
        where: list[Any] = []
        if self.states:
            where.append(col(Enrollment.state).in_([s.value for s in self.states]))
        if self.ids:
            where.append(col(Enrollment.id).in_(self.ids))
        if self.email is not None:
            where.append(col(Lead.email) == self.email)
        if self.sequence is not None:
            where.append(col(Enrollment.sequence) == self.sequence)
        if self.transition_id is not None:
            where.append(col(Enrollment.transition_id) == self.transition_id)
        return where


_ROW_COLUMNS = (
    col(Enrollment.id),
    col(Lead.email),
    col(Enrollment.sequence),
    col(Enrollment.stage),
    col(Enrollment.state),
    col(Enrollment.started_at),
    col(Enrollment.steps_done),
    col(Enrollment.next_due_at),
    col(Enrollment.exit_reason),
    col(Enrollment.ended_at),
    col(Enrollment.waiting_until),
)


def list_enrollments(
    *, session: Session, selection: EnrollmentSelection, limit: int | None = None
) -> list[EnrollmentRow]:
    """The selected enrollments, most recently started first, each with its step in flight if any."""
    query = (
        select(*_ROW_COLUMNS)
        .join(Lead, col(Lead.id) == col(Enrollment.lead_id))
        .where(*selection.conditions())
        .order_by(col(Enrollment.started_at).desc(), col(Enrollment.id).desc())
    )
    if limit is not None:
        query = query.limit(limit)
    rows = list(session.execute(query))
    waiting = [r for r in rows if r.state == EnrollmentState.active and r.next_due_at is None and r.steps_done]
    flights = _steps_in_flight(session, {int(r.id): r.steps_done[-1] for r in waiting})
    return [
        EnrollmentRow(
            id=int(r.id),
            email=r.email,
            sequence=r.sequence,
            stage=r.stage,
            state=r.state,
            started_at=r.started_at,
            steps_done=tuple(r.steps_done or ()),
            next_due_at=r.next_due_at,
            exit_reason=r.exit_reason,
            ended_at=r.ended_at,
            in_flight=flights.get(int(r.id)),
            waiting_until=r.waiting_until if r.state == EnrollmentState.active else None,
        )
        for r in rows
    ]


def _steps_in_flight(session: Session, last_step: dict[int, str]) -> dict[int, StepInFlight]:
    """The message of each enrollment's last step (a step is one message per enrollment: its idempotency key)."""
    found: dict[int, StepInFlight] = {}
    for ids in batched(sorted(last_step)):
        query = select(col(Message.id), col(Message.enrollment_id), col(Message.step_id), col(Message.status)).where(
            col(Message.enrollment_id).in_(ids)
        )
        for row in session.execute(query):
            if last_step[int(row.enrollment_id)] == row.step_id:
                found[int(row.enrollment_id)] = StepInFlight(row.step_id, int(row.id), row.status)
    return found


def lead_exists(*, session: Session, email: str) -> bool:
    return session.scalar(select(col(Lead.id)).where(col(Lead.email) == email)) is not None


def existing_enrollment_ids(*, session: Session, ids: Iterable[int]) -> set[int]:
    """Which of these ids are enrollments at all (whatever their state): the others are typos."""
    wanted = sorted(set(ids))
    found: set[int] = set()
    for batch in batched(wanted):
        query = select(col(Enrollment.id)).where(col(Enrollment.id).in_(batch))
        found.update(int(i) for i in session.scalars(query) if i is not None)
    return found


def unscored_changes(*, session: Session, email: str, now: datetime) -> int:
    """Events up to ``now`` not yet in the lead's score, plus one for a profile change not yet scored.

    A manual stage change scores them first, so that the next cycle does not undo it.
    """
    lead = session.execute(select(col(Lead.id), col(Lead.needs_rescore)).where(col(Lead.email) == email)).first()
    if lead is None:
        return 0
    events = session.scalar(
        select(func.count()).where(
            col(Event.lead_id) == lead.id, is_pending(col(Event.applied)), col(Event.occurred_at) <= now
        )
    )
    return int(events or 0) + int(bool(lead.needs_rescore))


@dataclass(frozen=True, slots=True)
class ExitResult:
    """What ending enrollments by hand did."""

    exited: tuple[int, ...]
    messages_cancelled: int
    # Messages a dispatcher already holds (claimed or sending): left to it, so they may still go out.
    with_dispatcher: int


def exit_enrollments(*, session: Session, ids: Sequence[int], reason: str, now: datetime) -> ExitResult:
    """End these enrollments as exited by an operator and cancel their queued messages.

    Only those still active when the transaction locks them: one that a cycle
    completed meanwhile stays completed. On PostgreSQL the lock waits for a cycle
    deciding the same enrollment's step, so the step it queues is cancelled too.
    """
    active: list[int] = []
    for batch in batched(sorted(set(ids))):
        query = (
            select(col(Enrollment.id))
            .where(col(Enrollment.id).in_(batch), col(Enrollment.state) == EnrollmentState.active)
            .with_for_update()
        )
        active.extend(int(i) for i in session.scalars(query) if i is not None)
    cancelled = end_enrollments(
        session=session,
        ended=[(ident, f"operator: {reason}") for ident in active],
        state=EnrollmentState.exited,
        now=now,
        cancel_why=f"enrollment exited by an operator: {reason}",
    )
    held = 0
    for batch in batched(active):
        held += int(
            session.scalar(
                select(func.count()).where(
                    col(Message.enrollment_id).in_(batch),
                    col(Message.status).in_([MessageStatus.claimed, MessageStatus.sending]),
                )
            )
            or 0
        )
    return ExitResult(tuple(active), cancelled, held)


def queued_messages(*, session: Session, enrollment_ids: Sequence[int]) -> int:
    """How many messages of these enrollments a dispatcher has yet to take (what an exit would cancel)."""
    total = 0
    for batch in batched(sorted(set(enrollment_ids))):
        total += int(
            session.scalar(
                select(func.count()).where(
                    col(Message.enrollment_id).in_(batch), col(Message.status) == MessageStatus.queued
                )
            )
            or 0
        )
    return total


@dataclass(frozen=True, slots=True)
class Pause:
    """A paused sequence: since when, and why."""

    sequence: str
    paused_at: datetime
    reason: str | None


@dataclass(frozen=True, slots=True)
class PauseResult:
    """The sequence's pause, and whether this call made it (False: it was paused already)."""

    pause: Pause
    created: bool


def pause_sequence(*, session: Session, name: str, reason: str | None, now: datetime) -> PauseResult:
    """Pause a sequence; pausing it again keeps the first pause (its time and reason)."""
    table = SequencePause.__table__  # type: ignore[attr-defined]
    inserted = session.execute(
        dialect_insert(session, table)
        .values(sequence=name, paused_at=now, reason=reason)
        .on_conflict_do_nothing(index_elements=["sequence"])
        .returning(table.c.sequence)
    ).first()
    pause = _pause(session, name)
    assert pause is not None
    return PauseResult(pause, created=inserted is not None)


def resume_sequence(*, session: Session, name: str) -> Pause | None:
    """Lift a sequence's pause; returns the pause lifted (None: it was not paused)."""
    pause = _pause(session, name)
    if pause is not None:
        session.execute(SequencePause.__table__.delete().where(col(SequencePause.sequence) == name))  # type: ignore[attr-defined]
    return pause


def _pause(session: Session, name: str) -> Pause | None:
    row = session.execute(
        select(col(SequencePause.sequence), col(SequencePause.paused_at), col(SequencePause.reason)).where(
            col(SequencePause.sequence) == name
        )
    ).first()
    return None if row is None else Pause(row.sequence, row.paused_at, row.reason)


def list_pauses(*, session: Session) -> list[Pause]:
    query = select(col(SequencePause.sequence), col(SequencePause.paused_at), col(SequencePause.reason)).order_by(
        col(SequencePause.sequence)
    )
    return [Pause(row.sequence, row.paused_at, row.reason) for row in session.execute(query)]


@dataclass(frozen=True, slots=True)
class SequenceLoad:
    """Where a sequence's active enrollments are, as of ``now``."""

    active: int = 0
    # Active, and their next step was due by now: each takes one step at the next cycle (the catch-up rule).
    due: int = 0
    # Active, waiting for the message of their last step.
    in_flight: int = 0
    # Unsent messages of the sequence that a dispatcher has yet to take.
    queued_messages: int = 0


def sequence_loads(*, session: Session, now: datetime, names: Iterable[str] | None = None) -> dict[str, SequenceLoad]:
    """Each sequence's active enrollments (due, in flight) and queued messages; only ``names`` if given."""
    wanted = None if names is None else sorted(set(names))
    due = col(Enrollment.next_due_at) <= now
    enrollments = select(
        col(Enrollment.sequence),
        func.count(),
        func.count().filter(due),
        func.count().filter(col(Enrollment.next_due_at).is_(None)),
    ).where(col(Enrollment.state) == EnrollmentState.active)
    messages = select(col(Message.sequence), func.count()).where(col(Message.status) == MessageStatus.queued)
    if wanted is not None:
        enrollments = enrollments.where(col(Enrollment.sequence).in_(wanted))
        messages = messages.where(col(Message.sequence).in_(wanted))
    counts: dict[str, list[int]] = {}
    for name, active, due_now, waiting in session.execute(enrollments.group_by(col(Enrollment.sequence))):
        counts[str(name)] = [int(active), int(due_now), int(waiting), 0]
    for name, queued in session.execute(messages.group_by(col(Message.sequence))):
        counts.setdefault(str(name), [0, 0, 0, 0])[3] = int(queued)
    return {name: SequenceLoad(*values) for name, values in counts.items()}
