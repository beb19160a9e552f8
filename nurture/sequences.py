"""Nurture sequences: who is enrolled, and which step each enrollment takes next, under the playbook as it is now.

An enrollment walks its sequence one step at a time. It remembers the ids of
the steps it has taken (``steps_done``) and when the last one was settled (sent,
skipped, failed or left in doubt); nothing about the steps to come is written
down in advance. So:

- the next step is decided only when it is due, under the playbook of that
  moment: a step the marketer removed is never sent, an edited one sends its new
  content, and a step added after the last one taken is walked into;
- ``after`` counts from when the previous step settled (the first step: from
  the stage change), and a step is decided at most once per cycle, so a
  dispatcher that was down for days sends one step per enrollment, then spaces
  the rest by their ``after`` again (the catch-up rule, docs/playbook.md);
- each decided step is one message with an idempotency key made of the
  enrollment and the step's id, so no step is ever sent twice in an enrollment.

The planners here take plain snapshots and return what to write; ``db/`` loads
and persists. Pure: no clock, no database.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from nurture.playbook import Condition, Playbook, Reentry, ReentryRule, Sequence, Stage, Step
from nurture.scoring import ActivityEvent


class EnrollmentState(StrEnum):
    active = "active"
    # Walked to its last step.
    completed = "completed"
    # Ended early: the lead left the stage, the address was suppressed, an operator, a removed sequence.
    exited = "exited"
    # Never started: the sequence's reentry rule refused it (kept, so "why no welcome email?" has an answer).
    skipped = "skipped"
    # Ended because the lead reached the sequence's goal.
    converted = "converted"


@dataclass(frozen=True, slots=True)
class Transition:
    """A stage change that has been recorded (it has an id), as enrollments need it."""

    lead_id: int
    from_stage: Stage
    to_stage: Stage
    transition_id: int


@dataclass(frozen=True, slots=True)
class PlannedEnrollment:
    """An enrollment to create: active with its first step's due time, or skipped with the reason."""

    key: str
    lead_id: int
    sequence: str
    stage: Stage
    transition_id: int
    state: EnrollmentState
    next_due_at: datetime | None
    reason: str | None = None


def enrollment_key(*, lead_id: int, sequence: str, transition_id: int) -> str:
    """Identifies an enrollment: one per lead, sequence and transition."""
    return f"lead-{lead_id}/{sequence}/transition-{transition_id}"


def idempotency_key(*, lead_id: int, sequence: str, transition_id: int, step_id: str) -> str:
    """The unique key of one message: a step is sent at most once per enrollment, whatever replays.

    ``step:`` (not the ``step-N`` of positions, used before step ids) keeps new keys apart from old ones.
    """
    return f"{enrollment_key(lead_id=lead_id, sequence=sequence, transition_id=transition_id)}/step:{step_id}"


def reentry_refusal(rule: Reentry, last_started: datetime | None, now: datetime) -> str | None:
    """Why a lead last enrolled at ``last_started`` may not enter the sequence again now, or None."""
    if last_started is None or rule.rule == ReentryRule.always:
        return None
    if rule.rule == ReentryRule.once:
        return f"reentry: once (already enrolled on {last_started:%Y-%m-%d})"
    assert rule.after is not None
    if now - last_started < rule.after:
        return f"reentry: {rule.describe()} (last enrolled on {last_started:%Y-%m-%d})"
    return None


def plan_enrollments(
    transitions: Iterable[Transition],
    *,
    playbook: Playbook,
    now: datetime,
    last_enrolled: Mapping[tuple[int, str], datetime],
) -> list[PlannedEnrollment]:
    """The enrollments these transitions start, in order; ``last_enrolled`` holds when each
    (lead, sequence) last started an enrollment that was not skipped."""
    planned: list[PlannedEnrollment] = []
    entered: dict[tuple[int, str], datetime] = dict(last_enrolled)
    for transition in transitions:
        for name in playbook.sequences_for(transition.from_stage, transition.to_stage):
            sequence = playbook.sequences[name]
            refusal = reentry_refusal(sequence.reentry, entered.get((transition.lead_id, name)), now)
            key = enrollment_key(lead_id=transition.lead_id, sequence=name, transition_id=transition.transition_id)
            if refusal is None:
                entered[(transition.lead_id, name)] = now
            planned.append(
                PlannedEnrollment(
                    key=key,
                    lead_id=transition.lead_id,
                    sequence=name,
                    stage=transition.to_stage,
                    transition_id=transition.transition_id,
                    state=EnrollmentState.skipped if refusal else EnrollmentState.active,
                    next_due_at=None if refusal else now + sequence.steps[0].after,
                    reason=refusal,
                )
            )
    return planned


def exits_on_transition(enrolled_stage: Stage, new_stage: Stage) -> bool:
    """An enrollment ends when the lead leaves the stage it was enrolled for."""
    return enrolled_stage != new_stage


def next_step(sequence: Sequence, steps_done: Seq[str]) -> tuple[int, Step] | None:
    """The step an enrollment takes next under the sequence as it is now, with its position.

    The first step after the last step taken that is still in the sequence, and not
    taken before (a marketer may have reordered). If none of the steps taken are left,
    the first step not taken. None: nothing is left to send.
    """
    done = set(steps_done)
    start = 0
    for step_id in reversed(steps_done):
        position = sequence.position(step_id)
        if position is not None:
            start = position + 1
            break
    for position in range(start, len(sequence.steps)):
        if sequence.steps[position].id not in done:
            return position, sequence.steps[position]
    return None


@dataclass(frozen=True, slots=True)
class EnrollmentSnapshot:
    """Where an enrollment is: the steps it has taken, and when the last one settled."""

    id: int
    lead_id: int
    sequence: str
    transition_id: int
    steps_done: tuple[str, ...]
    # When the last step settled; the stage change's time before the first step.
    last_step_at: datetime


@dataclass(frozen=True, slots=True)
class Activity:
    """What a lead did since it enrolled: the steps whose email it opened or clicked, the event kinds."""

    opened: frozenset[str] = frozenset()
    clicked: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()

    def did(self, condition: Condition) -> bool:
        if condition.opened is not None:
            return condition.opened in self.opened
        if condition.clicked is not None:
            return condition.clicked in self.clicked
        return condition.event in self.events


NO_ACTIVITY = Activity()


def skip_reason(step: Step, activity: Activity) -> str | None:
    """Why the step's conditions say not to send it, or None to send it."""
    if step.unless is not None and activity.did(step.unless):
        return f"skipped: unless {step.unless.describe()}, and the lead did"
    if step.only_if is not None and not activity.did(step.only_if):
        return f"skipped: only if {step.only_if.describe()}, and the lead did not"
    return None


def has_conditions(playbook: Playbook) -> bool:
    """Whether any step has a condition (then the walk loads what the leads did)."""
    return any(step.unless or step.only_if for seq in playbook.sequences.values() for step in seq.steps)


@dataclass(frozen=True, slots=True)
class StepToSend:
    """A decided step: one message row, queued in the same transaction as the decision."""

    lead_id: int
    enrollment_id: int
    sequence: str
    step_id: str
    position: int
    template: str
    subject: str
    idempotency_key: str
    playbook_version: str
    due_at: datetime
    # Set when its condition said not to send it: the message is recorded as skipped, never sent.
    skipped: str | None = None


@dataclass(frozen=True, slots=True)
class EnrollmentChange:
    """What to write on an enrollment: where it goes next, or how it ended.

    ``next_due_at`` None on an active enrollment means a step is in flight: the
    enrollment waits for its message to settle.
    """

    enrollment_id: int
    state: EnrollmentState
    steps_done: tuple[str, ...]
    last_step_at: datetime
    next_due_at: datetime | None
    reason: str | None = None
    send: StepToSend | None = None


def _ended(snapshot: EnrollmentSnapshot, state: EnrollmentState, reason: str | None) -> EnrollmentChange:
    return EnrollmentChange(
        snapshot.id, state, snapshot.steps_done, snapshot.last_step_at, next_due_at=None, reason=reason
    )


def decide_due_steps(
    enrollments: Iterable[EnrollmentSnapshot],
    *,
    playbook: Playbook,
    now: datetime,
    activity: Mapping[int, Activity] | None = None,
) -> list[EnrollmentChange]:
    """For enrollments whose next step was due by ``now``: send it, skip it, wait longer, or end.

    The step is looked up again here: removed → the next one that still exists;
    its ``after`` made longer since → wait until then. ``activity`` (by enrollment id) is what
    each lead did since enrolling, for the steps' ``unless`` / ``only_if``: a step they rule
    out is recorded as skipped, and the next step is due ``after`` its delay from now.
    """
    changes: list[EnrollmentChange] = []
    for snapshot in enrollments:
        sequence = playbook.sequences.get(snapshot.sequence)
        if sequence is None:
            changes.append(_ended(snapshot, EnrollmentState.exited, "sequence removed from the playbook"))
            continue
        found = next_step(sequence, snapshot.steps_done)
        if found is None:
            changes.append(_ended(snapshot, EnrollmentState.completed, None))
            continue
        position, step = found
        due = snapshot.last_step_at + step.after
        if due > now:
            changes.append(
                EnrollmentChange(
                    snapshot.id, EnrollmentState.active, snapshot.steps_done, snapshot.last_step_at, next_due_at=due
                )
            )
            continue
        send = StepToSend(
            lead_id=snapshot.lead_id,
            enrollment_id=snapshot.id,
            sequence=snapshot.sequence,
            step_id=step.id,
            position=position,
            template=step.template,
            subject=step.subject,
            idempotency_key=idempotency_key(
                lead_id=snapshot.lead_id,
                sequence=snapshot.sequence,
                transition_id=snapshot.transition_id,
                step_id=step.id,
            ),
            playbook_version=playbook.version,
            due_at=now,
            skipped=skip_reason(step, (activity or {}).get(snapshot.id, NO_ACTIVITY)),
        )
        done = (*snapshot.steps_done, step.id)
        if send.skipped is None:
            changes.append(
                EnrollmentChange(
                    snapshot.id, EnrollmentState.active, done, snapshot.last_step_at, next_due_at=None, send=send
                )
            )
            continue
        # Skipped: settled at once, so the walk goes on from now.
        [moved] = after_steps_settled(
            [
                SettledStep(
                    EnrollmentSnapshot(
                        snapshot.id, snapshot.lead_id, snapshot.sequence, snapshot.transition_id, done, now
                    )
                )
            ],
            playbook=playbook,
            at=now,
        )
        changes.append(
            EnrollmentChange(
                moved.enrollment_id, moved.state, done, now, moved.next_due_at, reason=moved.reason, send=send
            )
        )
    return changes


@dataclass(frozen=True, slots=True)
class SettledStep:
    """An enrollment whose step in flight has just settled, and how."""

    enrollment: EnrollmentSnapshot
    # Whether the address turned out to be suppressed: then nothing more is sent.
    suppressed: bool = False


def after_steps_settled(settled: Iterable[SettledStep], *, playbook: Playbook, at: datetime) -> list[EnrollmentChange]:
    """Where each enrollment goes once its step in flight settled at ``at``: the next step's
    due time (``after`` counts from now), completed, or exited."""
    changes: list[EnrollmentChange] = []
    for item in settled:
        snapshot = item.enrollment
        moved = EnrollmentSnapshot(
            snapshot.id, snapshot.lead_id, snapshot.sequence, snapshot.transition_id, snapshot.steps_done, at
        )
        sequence = playbook.sequences.get(snapshot.sequence)
        if item.suppressed:
            changes.append(_ended(moved, EnrollmentState.exited, "address suppressed"))
        elif sequence is None:
            changes.append(_ended(moved, EnrollmentState.exited, "sequence removed from the playbook"))
        elif (found := next_step(sequence, snapshot.steps_done)) is None:
            changes.append(_ended(moved, EnrollmentState.completed, None))
        else:
            changes.append(
                EnrollmentChange(
                    snapshot.id, EnrollmentState.active, snapshot.steps_done, at, next_due_at=at + found[1].after
                )
            )
    return changes


def step_now(playbook: Playbook, sequence: str, step_id: str) -> Step | None:
    """The step as the playbook has it now (None: removed, or its sequence is), for what a due message sends."""
    found = playbook.sequences.get(sequence)
    if found is None:
        return None
    position = found.position(step_id)
    return None if position is None else found.steps[position]


@dataclass(frozen=True, slots=True)
class Conversion:
    """An enrollment whose lead reached its sequence's goal: by which event, when, after which step."""

    enrollment_id: int
    kind: str
    at: datetime
    # The last step the enrollment had taken (None: the goal came before its first step).
    after_step: str | None

    @property
    def reason(self) -> str:
        return f"goal reached: {self.kind} on {self.at:%Y-%m-%d %H:%M} UTC"


def goal_kinds(playbook: Playbook) -> frozenset[str]:
    """Every event kind that is some sequence's goal (leads with one of these are checked)."""
    return frozenset(kind for seq in playbook.sequences.values() if seq.goal for kind in seq.goal.events)


@dataclass(frozen=True, slots=True)
class GoalCandidate:
    """An active enrollment of a lead with a new goal event: where it is, and since when."""

    enrollment: EnrollmentSnapshot
    started_at: datetime
    # Its last step taken is not settled yet (a queued one is cancelled by the conversion).
    in_flight: bool


def reached_goals(
    candidates: Iterable[GoalCandidate], *, events: Mapping[int, Seq[ActivityEvent]], playbook: Playbook
) -> list[Conversion]:
    """The enrollments whose lead did one of their goal's events since enrolling.

    The earliest such event counts; the conversion is credited to the last step settled before it.
    """
    conversions: list[Conversion] = []
    for candidate in candidates:
        snapshot = candidate.enrollment
        sequence = playbook.sequences.get(snapshot.sequence)
        if sequence is None or sequence.goal is None:
            continue
        reached = sorted(
            (e.occurred_at, e.kind)
            for e in events.get(snapshot.lead_id, ())
            if e.kind in sequence.goal.events and e.occurred_at >= candidate.started_at
        )
        if reached:
            at, kind = reached[0]
            settled = snapshot.steps_done[:-1] if candidate.in_flight else snapshot.steps_done
            conversions.append(Conversion(snapshot.id, kind, at, settled[-1] if settled else None))
    return conversions
