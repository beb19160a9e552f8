"""Advancing leads and walking sequences: load a snapshot (``db``), plan (the core), persist (``db``).

Each function works in the caller's transaction, so a chunk's scores,
transitions, enrollments and the steps they decide commit together or not at
all. No Prefect here: the flows call these in tasks, and tests and the CLI call
them directly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from db.cycle import (
    ChunkResult,
    active_enrollments,
    cancel_leftovers,
    due_enrollments,
    end_enrollments,
    goal_candidates,
    held_by_hand,
    insert_enrollments,
    last_enrollments,
    lead_activity,
    lock_lead,
    lock_leads,
    paused_sequences,
    pending_events,
    record_conversions,
    record_transitions,
    save_enrollment_changes,
    set_lead_stage,
    settling_enrollments,
    wake_waiting,
)
from db.enrollments import unscored_changes
from db.scoring import score_chunk
from flows.webhooks import announce_conversions, announce_transitions
from nurture.advancing import StageMove, check_move
from nurture.delivery import MessageStatus
from nurture.errors import NurtureError
from nurture.importing import canonical_address
from nurture.playbook import Playbook, Stage
from nurture.scoring import ActivityEvent
from nurture.sequences import (
    EnrollmentState,
    SettledStep,
    Transition,
    after_steps_settled,
    decide_due_steps,
    exits_on_transition,
    goal_kinds,
    plan_enrollments,
    reached_goals,
    reacting_sequences,
    waiting_sequences,
)

logger = logging.getLogger(__name__)

# A replay (rescore-all) runs one advance-leads task per chunk: at most this many task runs...
REPLAY_TASK_RUNS = 50
# ...with chunks of at most this many leads (a chunk's IN lists stay under SQLite's 32,766 variables and
# its snapshot small), so the bound holds below 1,250,000 leads; beyond, there are more chunks of this size.
MAX_CHUNK = 25_000


def replay_chunk_size(total: int, batch_size: int) -> int:
    """Leads per chunk for a replay of ``total`` leads: ``batch_size`` at least, and large enough for at
    most ``REPLAY_TASK_RUNS`` chunks (up to ``MAX_CHUNK`` leads per chunk)."""
    return max(batch_size, min(total // REPLAY_TASK_RUNS + 1, MAX_CHUNK))


def advance_leads(
    *,
    session: Session,
    lead_ids: Sequence[int],
    playbook: Playbook,
    now: datetime,
    flow_run_id: str | None = None,
    replay: bool = False,
) -> ChunkResult:
    """Rescore a chunk of leads, apply the transitions their scores call for, enroll them.

    With ``replay`` the scores are recomputed from every event under the current
    playbook (after its scoring rules changed) instead of brought forward.
    """
    result = ChunkResult(leads=len(lead_ids), last_lead_id=max(lead_ids, default=0))
    if not lead_ids:
        return result
    lock_leads(session=session, lead_ids=lead_ids)
    # Read before scoring marks them scored: the goal events among the leads' new ones.
    goal_events = (
        {} if replay else pending_events(session=session, lead_ids=lead_ids, kinds=goal_kinds(playbook), now=now)
    )
    held = held_by_hand(session=session, lead_ids=lead_ids) if replay else frozenset()
    scored = score_chunk(
        session=session,
        lead_ids=lead_ids,
        playbook=playbook,
        now=now,
        replay=replay,
        held=held,
        flow_run_id=flow_run_id,
    )
    result.score_changes = scored.score_changes
    # Before the moves: a goal event that also changes the stage converts the enrollment, not exits it.
    convert_on_goals(session=session, events=goal_events, playbook=playbook, now=now, result=result)
    # A wait_for's lead who did something is looked at by this cycle's walk, not at the deadline.
    wake_waiting(session=session, lead_ids=scored.with_events, sequences=waiting_sequences(playbook), now=now)
    apply_moves(session=session, moves=scored.moves, playbook=playbook, now=now, flow_run_id=flow_run_id, result=result)
    logger.info(
        "advanced leads %d–%d: %d score changes, %d transitions, %d enrollments",
        min(lead_ids),
        max(lead_ids),
        result.score_changes,
        sum(result.transitions.values()),
        result.enrollments,
    )
    return result


def apply_moves(
    *,
    session: Session,
    moves: Sequence[StageMove],
    playbook: Playbook,
    now: datetime,
    flow_run_id: str | None,
    result: ChunkResult,
) -> list[Transition]:
    """Record stage changes, end the enrollments whose stage the leads left, start the new ones.

    A new enrollment's first step is decided by the next walk of the sequences
    (:func:`walk_sequences`), in the same cycle when it is due at once.
    """
    transitions = record_transitions(
        session=session, moves=moves, playbook_version=playbook.version, now=now, flow_run_id=flow_run_id
    )
    if not transitions:
        return transitions
    announce_transitions(
        session=session,
        transitions=transitions,
        reasons=[m.reason for m in moves],
        playbook=playbook,
        now=now,
        result=result,
    )
    for move in moves:
        result.transitions[f"{move.from_stage.value}→{move.to_stage.value}"] += 1
        result.moved.append(move)
    new_stage = {t.lead_id: t.to_stage for t in transitions}
    leaving = [
        (e.id, f"lead left {e.stage.value} for {new_stage[e.lead_id].value}")
        for e in active_enrollments(session=session, lead_ids=list(new_stage))
        if exits_on_transition(e.stage, new_stage[e.lead_id])
    ]
    result.messages_cancelled += end_enrollments(
        session=session,
        ended=leaving,
        state=EnrollmentState.exited,
        now=now,
        cancel_why="enrollment exited: lead changed stage",
    )
    result.messages_cancelled += cancel_leftovers(
        session=session, new_stage=new_stage, now=now, why="enrollment exited: lead changed stage"
    )
    planned = plan_enrollments(
        transitions,
        playbook=playbook,
        now=now,
        last_enrolled=last_enrollments(session=session, lead_ids=list(new_stage)),
    )
    insert_enrollments(session=session, planned=planned, now=now)
    result.enrollments += sum(p.state == EnrollmentState.active for p in planned)
    result.enrollments_skipped += sum(p.state == EnrollmentState.skipped for p in planned)
    return transitions


def convert_on_goals(
    *,
    session: Session,
    events: Mapping[int, Sequence[ActivityEvent]],
    playbook: Playbook,
    now: datetime,
    result: ChunkResult,
) -> None:
    """End as converted the enrollments whose lead just did one of their sequence's goal events."""
    kinds = goal_kinds(playbook)
    leads = [lead_id for lead_id, done in events.items() if any(e.kind in kinds for e in done)]
    if not leads:
        return
    with_goal = [name for name, seq in playbook.sequences.items() if seq.goal is not None]
    candidates = goal_candidates(session=session, lead_ids=leads, sequences=with_goal)
    conversions = reached_goals(candidates, events=events, playbook=playbook)
    result.messages_cancelled += record_conversions(session=session, conversions=conversions, now=now)
    announce_conversions(
        session=session, conversions=conversions, candidates=candidates, playbook=playbook, now=now, result=result
    )
    result.conversions += len(conversions)


@dataclass
class WalkResult:
    """What one walk of the sequences decided."""

    enrollments: int = 0
    messages_queued: int = 0
    steps_skipped: int = 0
    waiting_longer: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    # wait_for branches decided, by the way they went ("then", "else").
    branches: dict[str, int] = field(default_factory=dict)
    # Messages queued per split-test variant ("sequence/step/variant").
    variants: dict[str, int] = field(default_factory=dict)

    def add(self, other: WalkResult) -> None:
        self.enrollments += other.enrollments
        self.messages_queued += other.messages_queued
        self.steps_skipped += other.steps_skipped
        self.waiting_longer += other.waiting_longer
        for mine, theirs in (
            (self.ended, other.ended),
            (self.branches, other.branches),
            (self.variants, other.variants),
        ):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n


def walk_sequences(*, session: Session, playbook: Playbook, now: datetime, limit: int) -> WalkResult:
    """Decide the next step of up to ``limit`` enrollments that are due, and queue it.

    Called once per cycle until it finds nothing: a decided step waits for its
    message to settle, so an enrollment takes at most one step per cycle.
    """
    snapshots = due_enrollments(session=session, now=now, limit=limit, paused=paused_sequences(session=session))
    reacting = reacting_sequences(playbook)
    activity = lead_activity(
        session=session, enrollment_ids=[s.id for s in snapshots if s.sequence in reacting], now=now
    )
    changes = decide_due_steps(snapshots, playbook=playbook, now=now, activity=activity)
    result = WalkResult(enrollments=len(snapshots))
    written = save_enrollment_changes(session=session, changes=changes, now=now)
    result.steps_skipped = sum(c.send is not None and c.send.skipped is not None for c in changes)
    result.messages_queued = written - result.steps_skipped
    for change in changes:
        if change.branched is not None:
            took = change.branched.took.value
            result.branches[took] = result.branches.get(took, 0) + 1
        if change.send is not None and change.send.variant is not None and change.send.skipped is None:
            arm = f"{change.send.sequence}/{change.send.step_id}/{change.send.variant}"
            result.variants[arm] = result.variants.get(arm, 0) + 1
        if change.send is not None and change.send.skipped is not None:
            continue
        if change.state != EnrollmentState.active:
            result.ended[change.state.value] = result.ended.get(change.state.value, 0) + 1
        elif change.send is None:
            result.waiting_longer += 1
    return result


def settle_steps(*, session: Session, message_ids: Sequence[int], playbook: Playbook, at: datetime) -> int:
    """Move on the enrollments whose step in flight is among these messages and has settled.

    Called in the transaction that settles the messages, so an enrollment never
    waits for a message that is already done. Returns how many moved on.
    """
    settled = [
        SettledStep(snapshot, suppressed=status == MessageStatus.suppressed)
        for snapshot, status in settling_enrollments(session=session, message_ids=message_ids)
    ]
    changes = after_steps_settled(settled, playbook=playbook, at=at)
    save_enrollment_changes(session=session, changes=changes, now=at)
    return len(changes)


# Kept with the transition (its reason column holds 500 characters, "manual: " included).
MAX_MANUAL_REASON = 200


def set_stage(
    *, session: Session, email: str, stage: Stage, reason: str, playbook: Playbook, now: datetime
) -> Transition:
    """Move a lead to ``stage`` by hand: a transition recorded as manual with the operator's reason,
    which ends and starts sequences like any other.

    The lead's activity up to ``now`` is scored first (as a cycle would), so the manual stage
    holds until its next event or profile change, and through rescore-all until then. Raises
    NurtureError for an unknown lead, the stage it is already in, a reason that is empty or too
    long, or a move the lifecycle forbids (customers stay customers).
    """
    reason = reason.strip()
    if not reason:
        raise NurtureError("say why with --reason: it is recorded with the transition")
    if len(reason) > MAX_MANUAL_REASON:
        raise NurtureError(f"the reason is {len(reason)} characters long; at most {MAX_MANUAL_REASON}")
    address = canonical_address(email.strip())
    lead = lock_lead(session=session, email=address)
    if lead is None:
        raise NurtureError(f"no lead with the address {email!r}")
    if unscored_changes(session=session, email=address, now=now):
        # Score what it did first, as a cycle would: the next cycle then finds nothing to undo.
        advance_leads(session=session, lead_ids=[lead.id], playbook=playbook, now=now)
        lead = lock_lead(session=session, email=address)
        assert lead is not None
    if lead.stage == stage:
        raise NurtureError(f"{lead.email} is already {stage.value}")
    check_move(lead.id, lead.stage, stage)
    move = StageMove(lead.id, lead.stage, stage, lead.score, f"manual: {reason}")
    set_lead_stage(session=session, lead_id=lead.id, stage=stage, now=now)
    [transition] = apply_moves(
        session=session, moves=[move], playbook=playbook, now=now, flow_run_id=None, result=ChunkResult()
    )
    return transition
