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

import hashlib
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from nurture.playbook import END, Condition, Playbook, Reentry, ReentryRule, Sequence, Stage, Step, Variant
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


class Took(StrEnum):
    then = "then"
    else_ = "else"


@dataclass(frozen=True, slots=True)
class Branch:
    """A ``wait_for`` decided: at which step, which way, where to (None: the next step in order), when."""

    step: str
    took: Took
    to: str | None
    at: datetime

    def to_json(self) -> dict[str, str | None]:
        return {"step": self.step, "took": self.took.value, "to": self.to, "at": self.at.isoformat()}

    @classmethod
    def from_json(cls, value: Mapping[str, str | None]) -> Branch:
        return cls(
            str(value["step"]), Took(str(value["took"])), value.get("to"), datetime.fromisoformat(str(value["at"]))
        )

    def describe(self) -> str:
        return f"{self.step}: {self.took.value} → {self.to or 'the next step'}"


def next_step(sequence: Sequence, steps_done: Seq[str], branches: Seq[Branch] = ()) -> tuple[int, Step] | None:
    """The step an enrollment takes next under the sequence as it is now, with its position.

    After a branch decided at the last step taken: its target (``end``: none), if it
    is still in the sequence. Otherwise the first step after the last step taken that
    is still in the sequence, and not taken before (a marketer may have reordered). If
    none of the steps taken are left, the first step not taken. None: nothing is left to send.
    """
    done = set(steps_done)
    if steps_done and branches and branches[-1].step == steps_done[-1] and branches[-1].to is not None:
        if branches[-1].to == END:
            return None
        target = sequence.position(branches[-1].to)
        if target is not None and branches[-1].to not in done:
            return target, sequence.steps[target]
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


def pending_wait(sequence: Sequence, steps_done: Seq[str], branches: Seq[Branch]) -> Step | None:
    """The last step taken, if it has a ``wait_for`` (as the playbook is now) not decided yet."""
    if not steps_done or (branches and branches[-1].step == steps_done[-1]):
        return None
    position = sequence.position(steps_done[-1])
    step = None if position is None else sequence.steps[position]
    return step if step is not None and step.wait_for is not None else None


def assign_variant(step: Step, *, lead_id: int, sequence: str) -> Variant | None:
    """The variant of a split-tested step this lead gets: a stable hash of the lead, sequence and step,
    so every replay and simulation assigns the same (None: the step has no variants)."""
    weights = [v.weight for v in step.variants]
    if not weights:
        return None
    digest = hashlib.sha256(f"{sequence}/{step.id}/{lead_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") % sum(weights)
    for variant in step.variants:
        if point < variant.weight:
            return variant
        point -= variant.weight
    raise AssertionError("unreachable: point < sum(weights)")


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
    # The wait_for branches decided so far, in order.
    branches: tuple[Branch, ...] = ()


@dataclass(frozen=True, slots=True)
class Activity:
    """What a lead did since it enrolled, each with the first time: the steps whose email it opened
    or clicked (a person's opens: machine opens are another kind), and the event kinds."""

    opened: Mapping[str, datetime] = field(default_factory=dict)
    clicked: Mapping[str, datetime] = field(default_factory=dict)
    events: Mapping[str, datetime] = field(default_factory=dict)

    def when(self, condition: Condition) -> datetime | None:
        """When the lead first did it since enrolling (None: it has not)."""
        if condition.opened is not None:
            return self.opened.get(condition.opened)
        if condition.clicked is not None:
            return self.clicked.get(condition.clicked)
        assert condition.event is not None
        return self.events.get(condition.event)

    def did(self, condition: Condition) -> bool:
        return self.when(condition) is not None


NO_ACTIVITY = Activity()


def skip_reason(step: Step, activity: Activity) -> str | None:
    """Why the step's conditions say not to send it, or None to send it."""
    if step.unless is not None and activity.did(step.unless):
        return f"skipped: unless {step.unless.describe()}, and the lead did"
    if step.only_if is not None and not activity.did(step.only_if):
        return f"skipped: only if {step.only_if.describe()}, and the lead did not"
    return None


def reacting_sequences(playbook: Playbook) -> frozenset[str]:
    """The sequences with a step that has a condition or a wait: the walk loads what their leads did."""
    return frozenset(
        name
        for name, seq in playbook.sequences.items()
        if any(step.unless or step.only_if or step.wait_for for step in seq.steps)
    )


def waiting_sequences(playbook: Playbook) -> frozenset[str]:
    """The sequences with a ``wait_for``: a lead's new event may end one of its waits."""
    return frozenset(name for name, seq in playbook.sequences.items() if any(step.wait_for for step in seq.steps))


def decide_branch(step: Step, *, settled_at: datetime, activity: Activity, now: datetime) -> Branch | None:
    """Which way a wait ends: ``then`` if the lead did it by the deadline (``within`` of the step
    settling), ``else`` once the deadline has passed without it; None: still waiting."""
    wait = step.wait_for
    assert wait is not None
    deadline = settled_at + wait.within
    done_at = activity.when(wait)
    if done_at is not None and done_at <= deadline:
        return Branch(step.id, Took.then, step.then, now)
    if now >= deadline:
        return Branch(step.id, Took.else_, step.else_, now)
    return None


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
    # The split test's variant this lead gets (None: no split test).
    variant: str | None = None


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
    branches: tuple[Branch, ...] = ()
    # Set while it waits on a wait_for: until when at the latest (a new event wakes it earlier).
    waiting_until: datetime | None = None
    # The branch decided by this change, if any (counted by the walk).
    branched: Branch | None = None


def _change(
    snapshot: EnrollmentSnapshot,
    state: EnrollmentState,
    next_due_at: datetime | None,
    *,
    reason: str | None = None,
    waiting_until: datetime | None = None,
) -> EnrollmentChange:
    return EnrollmentChange(
        snapshot.id,
        state,
        snapshot.steps_done,
        snapshot.last_step_at,
        next_due_at=next_due_at,
        reason=reason,
        branches=snapshot.branches,
        waiting_until=waiting_until,
    )


def _ended(snapshot: EnrollmentSnapshot, state: EnrollmentState, reason: str | None) -> EnrollmentChange:
    return _change(snapshot, state, None, reason=reason)


def decide_due_steps(
    enrollments: Iterable[EnrollmentSnapshot],
    *,
    playbook: Playbook,
    now: datetime,
    activity: Mapping[int, Activity] | None = None,
) -> list[EnrollmentChange]:
    """For enrollments due by ``now``: decide a wait, then send the next step, skip it, wait longer, or end.

    The step is looked up again here: removed → the next one that still exists;
    its ``after`` made longer since → wait until then. ``activity`` (by enrollment id) is what
    each lead did since enrolling, for the steps' ``unless`` / ``only_if`` and ``wait_for``: a
    step they rule out is recorded as skipped, and the next step is due ``after`` its delay from
    now; a wait decided sends the walk to its ``then`` or ``else``, whose ``after`` counts from now.
    """
    changes: list[EnrollmentChange] = []
    for snapshot in enrollments:
        sequence = playbook.sequences.get(snapshot.sequence)
        if sequence is None:
            changes.append(_ended(snapshot, EnrollmentState.exited, "sequence removed from the playbook"))
            continue
        done_so_far = (activity or {}).get(snapshot.id, NO_ACTIVITY)
        branched = None
        waiting = pending_wait(sequence, snapshot.steps_done, snapshot.branches)
        if waiting is not None:
            branched = decide_branch(waiting, settled_at=snapshot.last_step_at, activity=done_so_far, now=now)
            if branched is None:
                assert waiting.wait_for is not None
                deadline = snapshot.last_step_at + waiting.wait_for.within
                changes.append(_change(snapshot, EnrollmentState.active, deadline, waiting_until=deadline))
                continue
            snapshot = replace(snapshot, branches=(*snapshot.branches, branched), last_step_at=now)
        change = _take_next_step(snapshot, sequence=sequence, playbook=playbook, now=now, activity=done_so_far)
        changes.append(replace(change, branched=branched))
    return changes


def _take_next_step(
    snapshot: EnrollmentSnapshot, *, sequence: Sequence, playbook: Playbook, now: datetime, activity: Activity
) -> EnrollmentChange:
    found = next_step(sequence, snapshot.steps_done, snapshot.branches)
    if found is None:
        return _ended(snapshot, EnrollmentState.completed, None)
    position, step = found
    due = snapshot.last_step_at + step.after
    if due > now:
        return _change(snapshot, EnrollmentState.active, due)
    variant = assign_variant(step, lead_id=snapshot.lead_id, sequence=snapshot.sequence)
    template, subject = step.content_of(variant)
    send = StepToSend(
        lead_id=snapshot.lead_id,
        enrollment_id=snapshot.id,
        sequence=snapshot.sequence,
        step_id=step.id,
        position=position,
        template=template,
        subject=subject,
        idempotency_key=idempotency_key(
            lead_id=snapshot.lead_id,
            sequence=snapshot.sequence,
            transition_id=snapshot.transition_id,
            step_id=step.id,
        ),
        playbook_version=playbook.version,
        due_at=now,
        skipped=skip_reason(step, activity),
        variant=variant.id if variant else None,
    )
    taken = replace(snapshot, steps_done=(*snapshot.steps_done, step.id))
    if send.skipped is None:
        return replace(_change(taken, EnrollmentState.active, None), send=send)
    # Skipped: settled at once, so the walk goes on from now.
    [moved] = after_steps_settled([SettledStep(taken)], playbook=playbook, at=now)
    return replace(moved, send=send)


@dataclass(frozen=True, slots=True)
class SettledStep:
    """An enrollment whose step in flight has just settled, and how."""

    enrollment: EnrollmentSnapshot
    # Whether the address turned out to be suppressed: then nothing more is sent.
    suppressed: bool = False


def after_steps_settled(settled: Iterable[SettledStep], *, playbook: Playbook, at: datetime) -> list[EnrollmentChange]:
    """Where each enrollment goes once its step in flight settled at ``at``: the next step's
    due time (``after`` counts from now), a wait (due at once, so the walk looks at what the
    lead already did; the deadline is ``within`` from now), completed, or exited."""
    changes: list[EnrollmentChange] = []
    for item in settled:
        moved = replace(item.enrollment, last_step_at=at)
        sequence = playbook.sequences.get(moved.sequence)
        if item.suppressed:
            changes.append(_ended(moved, EnrollmentState.exited, "address suppressed"))
        elif sequence is None:
            changes.append(_ended(moved, EnrollmentState.exited, "sequence removed from the playbook"))
        elif (waiting := pending_wait(sequence, moved.steps_done, moved.branches)) is not None:
            assert waiting.wait_for is not None
            changes.append(_change(moved, EnrollmentState.active, at, waiting_until=at + waiting.wait_for.within))
        elif (found := next_step(sequence, moved.steps_done, moved.branches)) is None:
            changes.append(_ended(moved, EnrollmentState.completed, None))
        else:
            changes.append(_change(moved, EnrollmentState.active, at + found[1].after))
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
