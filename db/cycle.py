"""The cycle's reads and writes: leads to advance, their snapshots, and the plans the core made for them.

A cycle touches only leads that changed: new events up to ``now``, a profile
that changed, or a ``next_review_at`` that decay alone has reached; and only
enrollments whose next step is due. Each chunk is a handful of set-based queries
and bulk writes, whatever its size. Nothing here decides: the core's planners
(``nurture.advancing``, ``nurture.sequences``) do, and ``flows/`` puts the two together.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, any_, bindparam, case, func, insert, literal, select, union, update
from sqlalchemy.orm import Session, aliased
from sqlmodel import col

from db.engine import array_param, dialect_insert
from db.models import (
    Enrollment,
    Event,
    Lead,
    Message,
    ScoringState,
    SequencePause,
    StageTransition,
    UTCDateTime,
    is_pending,
    needs_rescore,
)
from nurture.advancing import StageMove
from nurture.delivery import MessageStatus
from nurture.playbook import Stage
from nurture.scoring import ActivityEvent
from nurture.sequences import (
    Activity,
    Branch,
    Conversion,
    EnrollmentChange,
    EnrollmentSnapshot,
    EnrollmentState,
    GoalCandidate,
    PlannedEnrollment,
    Transition,
)
from nurture.webhooks import Fact

# Keeps IN (...) lists and executemany batches well under every driver's limits.
_IN_BATCH = 5000

PROFILE_COLUMNS = (
    "email",
    "first_name",
    "last_name",
    "company",
    "job_title",
    "company_size",
    "country",
    "timezone",
    "attributes",
)


def batched(items: Sequence[Any], size: int = _IN_BATCH) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def candidate_ids(now: datetime, *, lo: int | None = None, hi: int | None = None) -> Any:
    """Ids of leads a cycle at ``now`` must look at (three indexed lookups), as a subquery with column ``id``;
    only those among ``lo..hi`` when given (each lookup is bounded, not the union)."""
    with_events: Any = select(col(Event.lead_id).label("id")).where(
        is_pending(col(Event.applied)), col(Event.occurred_at) <= now
    )
    profile_changed = select(col(Lead.id)).where(needs_rescore(col(Lead.needs_rescore)))
    review_due = select(col(Lead.id)).where(col(Lead.next_review_at) <= now)
    if lo is not None and hi is not None:
        # ``+ 0`` on the event side: SQLite would otherwise walk every event of the range through the
        # (lead, kind, time) index instead of the few pending ones through ix_event_pending.
        with_events = with_events.where((col(Event.lead_id) + 0).between(lo, hi))
        profile_changed = profile_changed.where(col(Lead.id).between(lo, hi))
        review_due = review_due.where(col(Lead.id).between(lo, hi))
    return union(with_events, profile_changed, review_due).subquery()


def count_leads_to_advance(*, session: Session, now: datetime) -> int:
    """How many leads the cycle at ``now`` will touch (to name chunks ``k/n``)."""
    return int(session.scalar(select(func.count()).select_from(candidate_ids(now))) or 0)


def next_lead_ids(*, session: Session, now: datetime, after_id: int, limit: int) -> list[int]:
    """The next chunk of leads to advance, in id order after ``after_id``."""
    candidates = candidate_ids(now)
    query = select(candidates.c.id).where(candidates.c.id > after_id).order_by(candidates.c.id).limit(limit)
    return [int(i) for i in session.scalars(query)]


@dataclass
class ChunkResult:
    """What advancing one chunk did; summed into the cycle's report."""

    leads: int = 0
    score_changes: int = 0
    transitions: Counter[str] = field(default_factory=Counter)
    enrollments: int = 0
    enrollments_skipped: int = 0
    conversions: int = 0
    messages_cancelled: int = 0
    last_lead_id: int = 0
    # Each transition, for events and the run's artifact.
    moved: list[StageMove] = field(default_factory=list)
    # The transitions and conversions as webhooks tell them, for the run's Prefect events.
    facts: list[Fact] = field(default_factory=list)

    def add(self, other: ChunkResult) -> None:
        self.leads += other.leads
        self.score_changes += other.score_changes
        self.transitions.update(other.transitions)
        self.enrollments += other.enrollments
        self.enrollments_skipped += other.enrollments_skipped
        self.conversions += other.conversions
        self.messages_cancelled += other.messages_cancelled
        self.last_lead_id = max(self.last_lead_id, other.last_lead_id)
        self.moved.extend(other.moved)
        self.facts.extend(other.facts)


def lock_leads(*, session: Session, lead_ids: Sequence[int]) -> None:
    """Lock a chunk's leads for advancing, in id order.

    PostgreSQL: a concurrent cycle waits instead of double-transitioning. NO KEY: events and
    messages inserted for these leads (foreign keys) by the API do not wait for the chunk.
    SQLite: nothing to do, the transaction took the database's write lock when it began.
    """
    if session.get_bind().dialect.name != "postgresql" or not lead_ids:
        return
    session.execute(
        select(col(Lead.id))
        .where(col(Lead.id) == any_(array_param(sorted(set(lead_ids)), BigInteger)))
        .order_by(col(Lead.id))
        .with_for_update(key_share=True)
    ).all()


def pending_events(
    *, session: Session, lead_ids: Sequence[int], kinds: Iterable[str], now: datetime
) -> dict[int, list[ActivityEvent]]:
    """The leads' events of these kinds up to ``now`` not yet in their scores."""
    kinds = sorted(kinds)
    events: dict[int, list[ActivityEvent]] = defaultdict(list)
    if not kinds:
        return events
    for ids in batched(list(lead_ids)):
        query = select(col(Event.lead_id), col(Event.kind), col(Event.occurred_at)).where(
            col(Event.lead_id).in_(ids),
            col(Event.kind).in_(kinds),
            col(Event.occurred_at) <= now,
            is_pending(col(Event.applied)),
        )
        for lead_id, kind, at in session.execute(query):
            events[lead_id].append(ActivityEvent(kind=kind, occurred_at=at))
    return dict(events)


def all_lead_ids(*, session: Session, after_id: int, limit: int) -> list[int]:
    """Every lead, a chunk at a time in id order (for a full replay)."""
    query = select(col(Lead.id)).where(col(Lead.id) > after_id).order_by(col(Lead.id)).limit(limit)
    return [int(i) for i in session.scalars(query) if i is not None]


def held_by_hand(*, session: Session, lead_ids: Sequence[int]) -> frozenset[int]:
    """Leads whose last transition an operator made (``manual:``) and with no event since it (a replay keeps
    their stage). Found from the manual transitions of the chunk's id range: few, whatever its size."""
    if not lead_ids:
        return frozenset()
    chunk = set(lead_ids)
    later = aliased(StageTransition)
    manual = {
        int(lead_id): at
        for lead_id, at in session.execute(
            select(col(StageTransition.lead_id), col(StageTransition.at)).where(
                col(StageTransition.lead_id).between(min(chunk), max(chunk)),
                col(StageTransition.reason).startswith("manual:"),
                ~select(literal(1))
                .where(col(later.lead_id) == col(StageTransition.lead_id), col(later.id) > col(StageTransition.id))
                .exists(),
            )
        )
        if lead_id in chunk
    }
    if not manual:
        return frozenset()
    latest: dict[int, datetime] = {
        int(lead_id): at
        for lead_id, at in session.execute(
            select(col(Event.lead_id), func.max(col(Event.occurred_at), type_=UTCDateTime()))
            .where(col(Event.lead_id).in_(list(manual)))
            .group_by(col(Event.lead_id))
        )
    }
    return frozenset(i for i, at in manual.items() if i not in latest or latest[i] <= at)


def record_transitions(
    *, session: Session, moves: Sequence[StageMove], playbook_version: str, now: datetime, flow_run_id: str | None
) -> list[Transition]:
    """Insert the stage transitions; returns them with their ids, in order."""
    if not moves:
        return []
    rows = [
        {
            "lead_id": m.lead_id,
            "from_stage": m.from_stage.value,
            "to_stage": m.to_stage.value,
            "at": now,
            "score": m.score,
            "reason": m.reason,
            "playbook_version": playbook_version,
            "flow_run_id": flow_run_id,
        }
        for m in moves
    ]
    returned = session.execute(
        insert(StageTransition).returning(col(StageTransition.id), sort_by_parameter_order=True), rows
    )
    return [Transition(m.lead_id, m.from_stage, m.to_stage, int(r.id)) for m, r in zip(moves, returned, strict=True)]


@dataclass(frozen=True, slots=True)
class ActiveEnrollment:
    id: int
    lead_id: int
    stage: Stage


def active_enrollments(*, session: Session, lead_ids: Sequence[int]) -> list[ActiveEnrollment]:
    """The leads' active enrollments (to exit those whose stage they left)."""
    found: list[ActiveEnrollment] = []
    for ids in batched(sorted(set(lead_ids))):
        query = select(col(Enrollment.id), col(Enrollment.lead_id), col(Enrollment.stage)).where(
            col(Enrollment.lead_id).in_(ids), col(Enrollment.state) == EnrollmentState.active
        )
        found.extend(ActiveEnrollment(int(r.id), int(r.lead_id), Stage(r.stage)) for r in session.execute(query))
    return found


def end_enrollments(
    *, session: Session, ended: Sequence[tuple[int, str]], state: EnrollmentState, now: datetime, cancel_why: str
) -> int:
    """End enrollments ((id, reason) each) and cancel their queued messages; returns how many were cancelled.

    A message already claimed or sending is left to its dispatcher.
    """
    if not ended:
        return 0
    session.execute(
        update(Enrollment),
        [
            {
                "id": ident,
                "state": state.value,
                "ended_at": now,
                "exit_reason": why,
                "next_due_at": None,
                "waiting_until": None,
            }
            for ident, why in ended
        ],
    )
    cancelled = 0
    for batch in batched([ident for ident, _ in ended]):
        result = session.execute(
            update(Message)
            .where(col(Message.enrollment_id).in_(batch), col(Message.status) == MessageStatus.queued)
            .values(status=MessageStatus.cancelled, last_error=cancel_why, updated_at=now)
        )
        cancelled += int(getattr(result, "rowcount", 0) or 0)
    return cancelled


def cancel_leftovers(*, session: Session, new_stage: Mapping[int, Stage], now: datetime, why: str) -> int:
    """Cancel queued messages of the leads' finished enrollments for another stage (a retried email
    of a completed sequence): a lead who left the stage must not get it."""
    stale: list[int] = []
    for ids in batched(sorted(new_stage)):
        query = (
            select(col(Message.id), col(Message.lead_id), col(Enrollment.stage))
            .join(Enrollment, col(Enrollment.id) == col(Message.enrollment_id))
            .where(
                col(Message.lead_id).in_(ids),
                col(Message.status) == MessageStatus.queued,
                col(Enrollment.state) != EnrollmentState.active,
            )
        )
        stale.extend(int(r.id) for r in session.execute(query) if r.stage != new_stage[int(r.lead_id)].value)
    for batch in batched(stale):
        session.execute(
            update(Message)
            .where(col(Message.id).in_(batch), col(Message.status) == MessageStatus.queued)
            .values(status=MessageStatus.cancelled, last_error=why, updated_at=now)
        )
    return len(stale)


def last_enrollments(*, session: Session, lead_ids: Sequence[int]) -> dict[tuple[int, str], datetime]:
    """When each (lead, sequence) last started an enrollment that was not skipped (for reentry rules)."""
    found: dict[tuple[int, str], datetime] = {}
    for ids in batched(sorted(set(lead_ids))):
        query = (
            select(
                col(Enrollment.lead_id),
                col(Enrollment.sequence),
                func.max(col(Enrollment.started_at), type_=UTCDateTime()),
            )
            .where(col(Enrollment.lead_id).in_(ids), col(Enrollment.state) != EnrollmentState.skipped)
            .group_by(col(Enrollment.lead_id), col(Enrollment.sequence))
        )
        for lead_id, sequence, started in session.execute(query):
            found[(int(lead_id), str(sequence))] = started
    return found


def insert_enrollments(*, session: Session, planned: Sequence[PlannedEnrollment], now: datetime) -> None:
    if not planned:
        return
    session.execute(
        insert(Enrollment),
        [
            {
                "key": p.key,
                "lead_id": p.lead_id,
                "sequence": p.sequence,
                "stage": p.stage.value,
                "transition_id": p.transition_id,
                "started_at": now,
                "state": p.state.value,
                "exit_reason": p.reason,
                "ended_at": None if p.state == EnrollmentState.active else now,
                "steps_done": [],
                "last_step_at": now,
                "next_due_at": p.next_due_at,
            }
            for p in planned
        ],
    )


def paused_sequences(*, session: Session) -> set[str]:
    return {str(name) for name in session.scalars(select(col(SequencePause.sequence)))}


def _snapshot(row: Any) -> EnrollmentSnapshot:
    return EnrollmentSnapshot(
        id=int(row.id),
        lead_id=int(row.lead_id),
        sequence=row.sequence,
        transition_id=int(row.transition_id),
        steps_done=tuple(row.steps_done or ()),
        last_step_at=row.last_step_at or row.started_at,
        branches=tuple(Branch.from_json(b) for b in row.branches or ()),
    )


_SNAPSHOT_COLUMNS = (
    col(Enrollment.id),
    col(Enrollment.lead_id),
    col(Enrollment.sequence),
    col(Enrollment.transition_id),
    col(Enrollment.steps_done),
    col(Enrollment.last_step_at),
    col(Enrollment.started_at),
    col(Enrollment.branches),
)


def due_enrollments(
    *, session: Session, now: datetime, limit: int, paused: Iterable[str] = ()
) -> list[EnrollmentSnapshot]:
    """Lock up to ``limit`` active enrollments whose next step is due by ``now`` (paused sequences aside).

    ``SKIP LOCKED`` on PostgreSQL: two cycles never decide the same enrollment's step.
    """
    query = (
        select(*_SNAPSHOT_COLUMNS)
        .where(
            col(Enrollment.next_due_at) <= now,
            col(Enrollment.state) == EnrollmentState.active,
        )
        .order_by(col(Enrollment.next_due_at), col(Enrollment.id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    paused = sorted(paused)
    if paused:
        query = query.where(col(Enrollment.sequence).not_in(paused))
    return [_snapshot(row) for row in session.execute(query)]


def settling_enrollments(*, session: Session, message_ids: Sequence[int]) -> list[tuple[EnrollmentSnapshot, str]]:
    """Active enrollments whose step in flight is one of these messages and has settled, with its status.

    A message is the step in flight of its enrollment when the enrollment waits
    (``next_due_at`` is NULL) and the message is its last step taken.
    """
    found: list[tuple[EnrollmentSnapshot, str]] = []
    # Table columns, not entity attributes: every settled send comes through here, so a Core select.
    enrollments, messages = Enrollment.__table__, Message.__table__  # type: ignore[attr-defined]
    e, m = enrollments.c, messages.c
    columns = [e.id, e.lead_id, e.sequence, e.transition_id, e.steps_done, e.last_step_at, e.started_at, e.branches]
    for ids in batched(sorted(set(message_ids))):
        query: Any = (
            select(*columns, m.step_id, m.status.label("message_status"))
            .join_from(enrollments, messages, m.enrollment_id == e.id)
            .where(
                m.id.in_(ids),
                m.status.not_in([MessageStatus.queued, MessageStatus.claimed, MessageStatus.sending]),
                e.state == EnrollmentState.active,
                e.next_due_at.is_(None),
            )
            .with_for_update(of=enrollments)
        )
        for row in session.execute(query):
            steps = tuple(row.steps_done or ())
            if steps and steps[-1] == row.step_id:
                found.append((_snapshot(row), str(row.message_status)))
    return found


def save_enrollment_changes(*, session: Session, changes: Sequence[EnrollmentChange], now: datetime) -> int:
    """Write where each enrollment goes, and queue the steps decided, in the caller's transaction.

    Returns how many messages were queued. A step already queued for its enrollment
    (its idempotency key exists) is not queued twice.
    """
    if not changes:
        return 0
    # One Core executemany: the ORM's bulk update by primary key costs several times more per row.
    enrollments = Enrollment.__table__  # type: ignore[attr-defined]
    session.execute(
        enrollments.update()
        .where(enrollments.c.id == bindparam("eid"))
        .values(
            state=bindparam("new_state"),
            steps_done=bindparam("new_steps_done", type_=enrollments.c.steps_done.type),
            last_step_at=bindparam("new_last_step_at", type_=enrollments.c.last_step_at.type),
            next_due_at=bindparam("new_next_due_at", type_=enrollments.c.next_due_at.type),
            exit_reason=bindparam("new_exit_reason"),
            ended_at=bindparam("new_ended_at", type_=enrollments.c.ended_at.type),
            branches=bindparam("new_branches", type_=enrollments.c.branches.type),
            waiting_until=bindparam("new_waiting_until", type_=enrollments.c.waiting_until.type),
        ),
        [
            {
                "eid": c.enrollment_id,
                "new_state": c.state.value,
                "new_steps_done": list(c.steps_done),
                "new_last_step_at": c.last_step_at,
                "new_next_due_at": c.next_due_at,
                "new_exit_reason": c.reason,
                "new_ended_at": None if c.state == EnrollmentState.active else now,
                "new_branches": [b.to_json() for b in c.branches],
                "new_waiting_until": c.waiting_until,
            }
            for c in changes
        ],
    )
    sends = [c.send for c in changes if c.send is not None]
    if not sends:
        return 0
    rows = [
        {
            "lead_id": s.lead_id,
            "enrollment_id": s.enrollment_id,
            "sequence": s.sequence,
            "step_id": s.step_id,
            "step": s.position,
            "template": s.template,
            "subject_template": s.subject,
            "variant": s.variant,
            "playbook_version": s.playbook_version,
            "idempotency_key": s.idempotency_key,
            "status": (MessageStatus.queued if s.skipped is None else MessageStatus.skipped).value,
            "last_error": s.skipped,
            "due_at": s.due_at,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
        for s in sends
    ]
    table = Message.__table__  # type: ignore[attr-defined]
    statement = (
        dialect_insert(session, table).on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(table.c.id)
    )
    return len(session.execute(statement, rows).all())


@dataclass(frozen=True, slots=True)
class LeadStanding:
    id: int
    email: str
    stage: Stage
    score: float


def lock_lead(*, session: Session, email: str) -> LeadStanding | None:
    """The lead with this address, locked until the transaction ends (a manual stage change)."""
    row = session.execute(
        select(col(Lead.id), col(Lead.email), col(Lead.stage), col(Lead.score))
        .where(col(Lead.email) == email)
        .with_for_update(key_share=True)
    ).first()
    return None if row is None else LeadStanding(int(row.id), row.email, Stage(row.stage), float(row.score))


def set_lead_stage(*, session: Session, lead_id: int, stage: Stage, now: datetime) -> None:
    """Write a stage an operator chose. Decay alone will not review it (``next_review_at`` cleared):
    the lead's next event or profile change rescores it under the thresholds again."""
    session.execute(
        update(Lead).where(col(Lead.id) == lead_id).values(stage=stage.value, next_review_at=None, updated_at=now)
    )


def goal_candidates(*, session: Session, lead_ids: Sequence[int], sequences: Iterable[str]) -> list[GoalCandidate]:
    """The leads' active enrollments in sequences that have a goal, locked (a conversion ends them)."""
    names = sorted(sequences)
    found: list[GoalCandidate] = []
    if not names:
        return found
    for ids in batched(sorted(set(lead_ids))):
        query = (
            select(*_SNAPSHOT_COLUMNS, col(Enrollment.next_due_at))
            .where(
                col(Enrollment.lead_id).in_(ids),
                col(Enrollment.state) == EnrollmentState.active,
                col(Enrollment.sequence).in_(names),
            )
            .order_by(col(Enrollment.id))
            .with_for_update()
        )
        found.extend(
            GoalCandidate(_snapshot(r), r.started_at, in_flight=r.next_due_at is None) for r in session.execute(query)
        )
    return found


def record_conversions(*, session: Session, conversions: Sequence[Conversion], now: datetime) -> int:
    """End converted enrollments and cancel what they still had queued; returns how many were cancelled."""
    if not conversions:
        return 0
    session.execute(
        update(Enrollment),
        [
            {
                "id": c.enrollment_id,
                "state": EnrollmentState.converted.value,
                "ended_at": now,
                "exit_reason": c.reason,
                "next_due_at": None,
                "waiting_until": None,
                "converted_at": c.at,
                "converted_after_step": c.after_step,
            }
            for c in conversions
        ],
    )
    cancelled = 0
    for batch in batched([c.enrollment_id for c in conversions]):
        result = session.execute(
            update(Message)
            .where(col(Message.enrollment_id).in_(batch), col(Message.status) == MessageStatus.queued)
            .values(status=MessageStatus.cancelled, last_error="enrollment converted: goal reached", updated_at=now)
        )
        cancelled += int(getattr(result, "rowcount", 0) or 0)
    return cancelled


# Stored event kinds of a person opening and clicking an email (a machine open is another kind).
OPEN, CLICK = "email_open", "email_click"


def lead_activity(*, session: Session, enrollment_ids: Sequence[int], now: datetime) -> dict[int, Activity]:
    """What each enrollment's lead did since it enrolled, up to ``now``, each with the first time:
    event kinds, and the steps of this enrollment whose email it opened or clicked (matched by message id)."""
    activity: dict[int, Activity] = {}
    if not enrollment_ids:
        return activity
    enrollments: list[Any] = []
    step_of: dict[int, tuple[int, str]] = {}
    for ids in batched(sorted(set(enrollment_ids))):
        enrollments.extend(
            session.execute(
                select(col(Enrollment.id), col(Enrollment.lead_id), col(Enrollment.started_at)).where(
                    col(Enrollment.id).in_(ids)
                )
            )
        )
        for mid, enrollment_id, step_id in session.execute(
            select(col(Message.id), col(Message.enrollment_id), col(Message.step_id)).where(
                col(Message.enrollment_id).in_(ids)
            )
        ):
            step_of[int(mid)] = (int(enrollment_id), step_id)
    since = min(e.started_at for e in enrollments)
    events: dict[int, list[Any]] = defaultdict(list)
    for ids in batched(sorted({int(e.lead_id) for e in enrollments})):
        query = (
            select(col(Event.lead_id), col(Event.kind), col(Event.occurred_at), col(Event.properties))
            .where(col(Event.lead_id).in_(ids), col(Event.occurred_at) >= since, col(Event.occurred_at) <= now)
            .order_by(col(Event.occurred_at))
        )
        for row in session.execute(query):
            events[int(row.lead_id)].append(row)
    for enrollment in enrollments:
        kinds: dict[str, datetime] = {}
        opened: dict[str, datetime] = {}
        clicked: dict[str, datetime] = {}
        for event in events.get(int(enrollment.lead_id), ()):  # oldest first: setdefault keeps the first time
            if event.occurred_at < enrollment.started_at:
                continue
            kinds.setdefault(event.kind, event.occurred_at)
            if event.kind in (OPEN, CLICK):
                found = step_of.get(_message_id((event.properties or {}).get("nurture_message_id")))
                if found is not None and found[0] == enrollment.id:
                    (opened if event.kind == OPEN else clicked).setdefault(found[1], event.occurred_at)
        activity[int(enrollment.id)] = Activity(opened, clicked, kinds)
    return activity


def wake_waiting(*, session: Session, lead_ids: Sequence[int], sequences: Iterable[str], now: datetime) -> int:
    """Make the enrollments of these leads (who just did something) in sequences with a ``wait_for``
    due now, so this cycle's walk looks at whether they did what a wait is for (the walk puts back the
    due time of those it finds not waiting). Returns how many rows were touched.

    Every active enrollment not in flight is matched, not only those due later than ``now``: on
    PostgreSQL an UPDATE whose WHERE no longer matches the committed row skips it without waiting,
    so a walk holding the row (about to write its deadline) would make this wake-up miss; matching
    on what the walk does not change makes this UPDATE wait for the walk's commit and apply after it.
    ``waiting_until`` is not required either: a wait added to a step leads had already passed, or
    one in progress when nurture was upgraded, has none until the walk first looks at it.
    """
    names = sorted(sequences)
    if not names:
        return 0
    woken = 0
    for ids in batched(sorted(set(lead_ids))):
        result = session.execute(
            update(Enrollment)
            .where(
                col(Enrollment.lead_id).in_(ids),
                col(Enrollment.state) == EnrollmentState.active,
                col(Enrollment.sequence).in_(names),
                col(Enrollment.next_due_at).is_not(None),
            )
            .values(next_due_at=case((col(Enrollment.next_due_at) > now, now), else_=col(Enrollment.next_due_at)))
        )
        woken += int(getattr(result, "rowcount", 0) or 0)
    return woken


def _message_id(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def scoring_version_in_use(*, session: Session) -> str | None:
    """The scoring rules the stored scores follow (None: not recorded yet)."""
    return session.scalar(select(col(ScoringState.scoring_version)).where(col(ScoringState.id) == 1))


def record_scoring_version(
    *, session: Session, version: str, now: datetime, set_by: str, only_if_unset: bool = False
) -> None:
    """Say the stored scores now follow these rules (a rescore-all applied them). ``only_if_unset``:
    the first cycle's record, which never replaces one (two first cycles at once: one row, no error)."""
    table = ScoringState.__table__  # type: ignore[attr-defined]
    values = {"id": 1, "scoring_version": version, "since": now, "set_by": set_by}
    statement = dialect_insert(session, table).values(**values)
    if only_if_unset:
        session.execute(statement.on_conflict_do_nothing(index_elements=["id"]))
    else:
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["id"], set_={"scoring_version": version, "since": now, "set_by": set_by}
            )
        )
