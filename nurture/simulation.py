"""Replaying one lead's stored history under a playbook: its stages, enrollments and every email decided.

The replay starts the lead cold when it arrived and walks its events in time order,
as a cycle running continuously would see them. The lead is looked at:

- at each of its events (goals first, then suppression, then its score and stage),
- when decay alone carries its score across a threshold (``next_review_at``),
- when one of its enrollments has a step due, or a wait ends,
- when an email held by the contact policy may go out.

Each look uses the core's own planners: ``event_points`` / ``rescore`` for the score,
``target_stage`` and the state machine for the stage, ``plan_enrollments`` for the
reentry rules, ``decide_due_steps`` / ``after_steps_settled`` for the walk (``after``,
``wait_for``, ``unless`` / ``only_if``, variants), ``reached_goals`` for goals and
``nurture.contact.decide`` for quiet hours, send windows and the frequency cap. So two
replays differ only by their playbook.

Opens and clicks are the stored ones: an open or click of a real email of a sequence's step
counts for the replayed enrollment of that sequence once the replay has sent that step. What
a lead would have done with emails it was never sent cannot be known.

Pure: no clock, no database; ``now`` is a parameter.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import date, datetime

from nurture.advancing import check_move
from nurture.contact import DueEmail, decide
from nurture.history import (
    CLICK,
    OPEN,
    EnrollmentOutcome,
    LeadHistory,
    LeadRun,
    Outcome,
    PastEvent,
    StageChange,
    StepOutcome,
)
from nurture.lifecycle import review_thresholds, target_stage
from nurture.playbook import Playbook, Stage
from nurture.scoring import (
    ActivityEvent,
    LeadScoreState,
    engagement_at,
    event_points,
    fit_breakdown,
    next_review_at,
    rescore,
)
from nurture.sequences import (
    Activity,
    EnrollmentChange,
    EnrollmentSnapshot,
    EnrollmentState,
    GoalCandidate,
    SettledStep,
    StepToSend,
    Transition,
    after_steps_settled,
    decide_due_steps,
    exits_on_transition,
    plan_enrollments,
    reached_goals,
    step_now,
)
from nurture.suppression import suppression_reason

# A replay that takes more looks than this is a bug (every look moves time or a walk forward).
_MAX_LOOKS = 1_000_000


@dataclass
class _Enrolled:
    snapshot: EnrollmentSnapshot
    stage: Stage
    started_at: datetime
    state: EnrollmentState = EnrollmentState.active
    reason: str | None = None
    next_due: datetime | None = None
    waiting_until: datetime | None = None
    # The step decided and not yet out (held by the contact policy), and until when.
    in_flight: StepToSend | None = None
    held_until: datetime | None = None
    # When each step's email went out: an open or click of it counts from then.
    sent_at: dict[str, datetime] = field(default_factory=dict)


@dataclass
class _Replay:
    lead: LeadHistory
    playbook: Playbook
    # The playbook that replaces ``playbook`` at ``switch_at`` (None: none, or already switched).
    switch_to: Playbook | None = None
    switch_at: datetime | None = None
    stage: Stage = Stage.cold
    # The profile's fit points under ``playbook`` (the profile does not change during a replay).
    fit: dict[str, float] | None = None
    score: LeadScoreState = field(default_factory=LeadScoreState)
    review_at: datetime | None = None
    counted: Counter[tuple[str, date]] = field(default_factory=Counter)
    applied: int = 0
    suppressed: bool = False
    enrolled: list[_Enrolled] = field(default_factory=list)
    refused: list[EnrollmentOutcome] = field(default_factory=list)
    last_enrolled: dict[tuple[int, str], datetime] = field(default_factory=dict)
    sent_times: list[datetime] = field(default_factory=list)
    # When the next look is due (None: nothing left to look at).
    pending: datetime | None = None
    emails: list[StepOutcome] = field(default_factory=list)
    transitions: list[StageChange] = field(default_factory=list)

    def advance(self, until: datetime, *, inclusive: bool = True) -> None:
        """Take every look before ``until`` (and at it, if ``inclusive``)."""
        at = self.pending
        looks = 0
        while at is not None and (at < until or (inclusive and at == until)):
            self._look(at)
            at = self._next_look()
            looks += 1
            if looks > _MAX_LOOKS:
                raise AssertionError(f"lead {self.lead.id}: the replay does not move forward at {at}")
        self.pending = at

    def fork(self, switch_to: Playbook, at: datetime) -> _Replay:
        """A copy of this replay so far, whose playbook is replaced by ``switch_to`` at ``at`` (no look
        was taken at or after ``at``): the two go on apart, sharing the lead and the playbooks."""
        other = copy.copy(self)
        other.counted = Counter(self.counted)
        other.enrolled = [replace(e, sent_at=dict(e.sent_at)) for e in self.enrolled]
        other.refused = list(self.refused)
        other.last_enrolled = dict(self.last_enrolled)
        other.sent_times = list(self.sent_times)
        other.emails = list(self.emails)
        other.transitions = list(self.transitions)
        other.switch_to, other.switch_at, other.pending = switch_to, at, at
        return other

    def run(self, now: datetime) -> LeadRun:
        """Take the looks left up to ``now``; what the replay did, with the lead's score at ``now``."""
        self.advance(now)
        for enrolled in self.enrolled:
            if enrolled.in_flight is not None:
                self._outcome(enrolled, Outcome.queued, now, "held by the contact policy when the replay ends")
        scoring = self.playbook.scoring
        fit = self.score.fit
        score = fit + engagement_at(self.score.engagement, self.score.scored_at, now, scoring.half_life)
        return LeadRun(
            stage=self.stage,
            score=score,
            transitions=tuple(self.transitions),
            emails=tuple(self.emails),
            enrollments=(
                *self.refused,
                *(EnrollmentOutcome(e.snapshot.sequence, e.started_at, e.state, e.reason) for e in self.enrolled),
            ),
        )

    # -- when to look next -------------------------------------------------------------------

    def _next_look(self) -> datetime | None:
        times: list[datetime] = []
        if self.switch_to is not None and self.switch_at is not None:
            times.append(self.switch_at)
        if self.applied < len(self.lead.events):
            times.append(self.lead.events[self.applied].occurred_at)
        if self.review_at is not None:
            times.append(self.review_at)
        for enrolled in self._active():
            if enrolled.in_flight is not None and enrolled.held_until is not None:
                times.append(enrolled.held_until)
            elif enrolled.next_due is not None:
                times.append(enrolled.next_due)
        return min(times) if times else None

    def _active(self) -> list[_Enrolled]:
        return [e for e in self.enrolled if e.state == EnrollmentState.active]

    # -- one look ----------------------------------------------------------------------------

    def _look(self, at: datetime) -> None:
        if self.switch_to is not None and self.switch_at is not None and self.switch_at <= at:
            self._switch(at)
        new: list[PastEvent] = []
        while self.applied < len(self.lead.events) and self.lead.events[self.applied].occurred_at <= at:
            new.append(self.lead.events[self.applied])
            self.applied += 1
        if new:
            self._reach_goals(new)
            self._suppress(new, at)
            for enrolled in self._active():
                # A new event wakes a wait: the walk looks at once whether the lead did what it waits for.
                if enrolled.waiting_until is not None and enrolled.in_flight is None:
                    enrolled.next_due = at
        if self.lead.suppressed_since is not None and self.lead.suppressed_since <= at and not self.suppressed:
            self._stop_mailing(at, "address suppressed")
        first = self.score.scored_at is None
        if new or first or (self.review_at is not None and self.review_at <= at):
            self._rescore(new, at)
        self._walk(at)
        self._dispatch(at)

    def _reach_goals(self, new: list[PastEvent]) -> None:
        candidates = {
            e.snapshot.id: GoalCandidate(e.snapshot, e.started_at, in_flight=e.in_flight is not None)
            for e in self._active()
        }
        events = {self.lead.id: [ActivityEvent(p.kind, p.occurred_at) for p in new]}
        for conversion in reached_goals(candidates.values(), events=events, playbook=self.playbook):
            enrolled = next(e for e in self.enrolled if e.snapshot.id == conversion.enrollment_id)
            self._end(
                enrolled,
                EnrollmentState.converted,
                conversion.reason,
                conversion.at,
                f"goal reached: {conversion.kind}",
            )

    def _suppress(self, new: list[PastEvent], at: datetime) -> None:
        reasons = [r for p in new if (r := suppression_reason(p.kind)) is not None]
        if reasons and not self.suppressed:
            self._stop_mailing(at, f"address suppressed: {reasons[0]}")

    def _stop_mailing(self, at: datetime, reason: str) -> None:
        self.suppressed = True
        for enrolled in self._active():
            if enrolled.in_flight is not None:
                self._outcome(enrolled, Outcome.suppressed, at, reason)
            enrolled.state, enrolled.reason = EnrollmentState.exited, reason
            enrolled.next_due = None

    def _end(
        self, enrolled: _Enrolled, state: EnrollmentState, reason: str, at: datetime, why: str | None = None
    ) -> None:
        if enrolled.in_flight is not None:
            self._outcome(enrolled, Outcome.cancelled, at, why or reason)
        enrolled.state, enrolled.reason = state, reason
        enrolled.next_due = None

    def _outcome(self, enrolled: _Enrolled, outcome: Outcome, at: datetime, reason: str | None) -> None:
        step = enrolled.in_flight
        assert step is not None
        self.emails.append(StepOutcome(step.sequence, step.step_id, outcome, at, reason))
        enrolled.in_flight = enrolled.held_until = None

    def _rescore(self, new: list[PastEvent], at: datetime, *, from_zero: bool = False) -> None:
        """Bring the score to ``at`` with the new events; ``from_zero``: score every event again under the
        playbook's rules, as the first cycle after a change of them does (a replay, ``plan_chunk``'s)."""
        playbook = self.playbook
        if from_zero:
            self.counted.clear()
        points = event_points(
            [ActivityEvent(p.kind, p.occurred_at) for p in new], playbook.scoring, at, already_counted=self.counted
        )
        for event in points.counted:
            self.counted[(event.kind, event.occurred_at.date())] += 1
        state = LeadScoreState(score=self.score.score) if from_zero else self.score
        if self.fit is None:
            self.fit = fit_breakdown(self.lead.profile, playbook.scoring.fit)
        update = rescore(
            state,
            profile=self.lead.profile,
            new_events=(),
            scoring=playbook.scoring,
            now=at,
            new_points=points,
            fit_points=self.fit,
        )
        self.score = LeadScoreState(update.fit, update.engagement, at, update.score)
        purchased = bool(update.kinds_seen & set(playbook.stages.customer.on_events))
        target = target_stage(update.score, self.stage, playbook.stages, purchased=purchased)
        self.review_at = None
        if target != Stage.customer:
            self.review_at = next_review_at(
                fit=update.fit,
                engagement=update.engagement,
                now=at,
                half_life=playbook.scoring.half_life,
                thresholds=review_thresholds(playbook.stages),
            )
        if target != self.stage:
            self._move(target, at)

    def _switch(self, at: datetime) -> None:
        """The new playbook goes live at ``at``: enrollments walk on under it, and if its scoring or
        stages changed, the lead is scored again from all its events, from the stage it is in."""
        assert self.switch_to is not None
        before, self.playbook, self.switch_to = self.playbook, self.switch_to, None
        self.fit = None
        if before.scoring_version != self.playbook.scoring_version:
            self._rescore(list(self.lead.events[: self.applied]), at, from_zero=True)

    def _move(self, target: Stage, at: datetime) -> None:
        check_move(self.lead.id, self.stage, target)
        source, self.stage = self.stage, target
        self.transitions.append(StageChange(source, target, at))
        for enrolled in self._active():
            if exits_on_transition(enrolled.stage, target):
                self._end(enrolled, EnrollmentState.exited, f"left {enrolled.stage} for {target}", at)
        transition = Transition(self.lead.id, source, target, len(self.transitions))
        planned = plan_enrollments([transition], playbook=self.playbook, now=at, last_enrolled=self.last_enrolled)
        for plan in planned:
            if plan.state == EnrollmentState.skipped:
                self.refused.append(EnrollmentOutcome(plan.sequence, at, plan.state, plan.reason))
                continue
            self.last_enrolled[(self.lead.id, plan.sequence)] = at
            snapshot = EnrollmentSnapshot(
                len(self.enrolled) + 1, self.lead.id, plan.sequence, transition.transition_id, (), at
            )
            self.enrolled.append(_Enrolled(snapshot, plan.stage, at, next_due=plan.next_due_at))

    # -- the walk and the dispatch -------------------------------------------------------------

    def _walk(self, at: datetime) -> None:
        for enrolled in self._active():
            if enrolled.in_flight is not None or enrolled.next_due is None or enrolled.next_due > at:
                continue
            activity = {enrolled.snapshot.id: self._activity(enrolled, at)}
            [change] = decide_due_steps([enrolled.snapshot], playbook=self.playbook, now=at, activity=activity)
            self._apply(enrolled, change)
            send = change.send
            if send is not None and send.skipped is not None:
                self.emails.append(StepOutcome(send.sequence, send.step_id, Outcome.skipped, at, send.skipped))
            elif send is not None:
                enrolled.in_flight, enrolled.held_until = send, at

    def _apply(self, enrolled: _Enrolled, change: EnrollmentChange) -> None:
        enrolled.snapshot = replace(
            enrolled.snapshot,
            steps_done=change.steps_done,
            last_step_at=change.last_step_at,
            branches=change.branches,
        )
        enrolled.state, enrolled.reason = change.state, change.reason
        enrolled.next_due, enrolled.waiting_until = change.next_due_at, change.waiting_until

    def _activity(self, enrolled: _Enrolled, at: datetime) -> Activity:
        """What the lead did since enrolling, up to ``at``: event kinds, and opens and clicks of the
        emails of this sequence's steps the replay sent before them."""
        kinds: dict[str, datetime] = {}
        opened: dict[str, datetime] = {}
        clicked: dict[str, datetime] = {}
        for event in self.lead.events[: self.applied]:
            if event.occurred_at < enrolled.started_at or event.occurred_at > at:
                continue
            kinds.setdefault(event.kind, event.occurred_at)
            if event.email_step is not None and event.email_step[0] == enrolled.snapshot.sequence:
                step_id = event.email_step[1]
                sent = enrolled.sent_at.get(step_id)
                if sent is not None and sent <= event.occurred_at and event.kind in (OPEN, CLICK):
                    (opened if event.kind == OPEN else clicked).setdefault(step_id, event.occurred_at)
        return Activity(opened, clicked, kinds)

    def _dispatch(self, at: datetime) -> None:
        due = [e for e in self._active() if e.in_flight is not None and e.held_until is not None and e.held_until <= at]
        if not due:
            return
        if self.suppressed:
            for enrolled in due:
                self._settle(enrolled, at, Outcome.suppressed, "address suppressed")
            return
        for enrolled in list(due):
            step = enrolled.in_flight
            assert step is not None
            if step_now(self.playbook, step.sequence, step.step_id) is None:
                # The playbook changed while it was held: as the dispatcher does, cancel it and walk on.
                gone = "step" if step.sequence in self.playbook.sequences else "sequence"
                self._settle(enrolled, at, Outcome.cancelled, f"{gone} removed from the playbook before it was sent")
                due.remove(enrolled)
        emails = [
            DueEmail(
                e.snapshot.id,
                self.lead.id,
                self.playbook.sequences[e.snapshot.sequence].priority,
                e.in_flight.due_at if e.in_flight else at,
                self.lead.timezone,
                send_window=self.playbook.send_window_for(e.snapshot.sequence),
            )
            for e in due
        ]
        verdicts = decide(
            emails, policy=self.playbook.contact_policy, recent_sends={self.lead.id: self.sent_times}, now=at
        )
        for enrolled in due:
            wait = verdicts.get(enrolled.snapshot.id)
            if wait is None:
                self.sent_times.append(at)
                self._settle(enrolled, at, Outcome.sent, None)
            else:
                enrolled.held_until = wait[0]

    def _settle(self, enrolled: _Enrolled, at: datetime, outcome: Outcome, reason: str | None) -> None:
        """The step in flight went out (or was suppressed, or cancelled): the walk goes on from ``at``."""
        step = enrolled.in_flight
        assert step is not None
        if outcome == Outcome.sent:
            enrolled.sent_at[step.step_id] = at
        self._outcome(enrolled, outcome, at, reason)
        settled = SettledStep(enrolled.snapshot, suppressed=outcome == Outcome.suppressed)
        [change] = after_steps_settled([settled], playbook=self.playbook, at=at)
        self._apply(enrolled, change)


def replay_lead(
    lead: LeadHistory,
    playbook: Playbook,
    *,
    now: datetime,
    switch_to: Playbook | None = None,
    switch_at: datetime | None = None,
) -> LeadRun:
    """The lead's stages, enrollments and emails had ``playbook`` been in force for all its history,
    or until ``switch_at``, when ``switch_to`` went live (as a deployed change would)."""
    if switch_to is not None and (switch_at is None or switch_at <= lead.starts_at):
        playbook, switch_to = switch_to, None
    return _Replay(lead, playbook, switch_to, switch_at, pending=lead.starts_at).run(now)


def replay_both(
    lead: LeadHistory, current: Playbook, new: Playbook, *, now: datetime, switch_at: datetime | None
) -> tuple[LeadRun, LeadRun]:
    """``replay_lead`` under ``current`` and with ``new`` going live at ``switch_at`` (None: from the
    start), the history before ``switch_at`` replayed once for both."""
    if switch_at is None or switch_at <= lead.starts_at:
        return replay_lead(lead, current, now=now), replay_lead(lead, new, now=now)
    before = _Replay(lead, current, pending=lead.starts_at)
    before.advance(min(switch_at, now), inclusive=False)
    changed = before.fork(new, switch_at)
    return before.run(now), changed.run(now)
