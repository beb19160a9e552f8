"""The impact of a playbook change: two replays of every lead side by side, summed up.

``Impact.add`` takes one lead's replay under the current playbook and under the new one
and keeps only counts (and the few leads most affected), so a simulation's memory does not
grow with the number of leads. ``inflight_changes`` says what the new playbook does to the
enrollments active in the live database when it goes live.

Pure: no clock, no database.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nurture.history import LeadHistory, LeadRun, LiveEnrollment, Outcome
from nurture.playbook import Playbook, Stage
from nurture.sequences import EnrollmentState, next_step, step_now

SIDES = ("current", "new")
# In-flight examples kept per simulation (the counts cover all of them).
MAX_INFLIGHT_SHOWN = 50


@dataclass(frozen=True, slots=True)
class LeadDifference:
    """One lead whose replays differ: stage, score and emails sent in the window, current → new."""

    lead_id: int
    email: str
    stage: tuple[Stage, Stage]
    score: tuple[float, float]
    sent: tuple[int, int]

    @property
    def rank(self) -> tuple[int, int, float, int]:
        """Most affected first: a different stage, then more emails changed, then a larger score move."""
        return (
            int(self.stage[0] != self.stage[1]),
            abs(self.sent[1] - self.sent[0]),
            round(abs(self.score[1] - self.score[0]), 6),
            -self.lead_id,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "email": self.email,
            "stage": {"current": self.stage[0].value, "new": self.stage[1].value},
            "score": {"current": round(self.score[0], 2), "new": round(self.score[1], 2)},
            "emails_sent": {"current": self.sent[0], "new": self.sent[1]},
        }


@dataclass(frozen=True, slots=True)
class InflightChange:
    """What the new playbook does to one active enrollment of the live database."""

    enrollment_id: int
    email: str
    sequence: str
    change: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "enrollment_id": self.enrollment_id,
            "email": self.email,
            "sequence": self.sequence,
            "change": self.change,
            "detail": self.detail,
        }


def _step_label(step: Any) -> tuple[Any, ...]:
    return (step.after, step.contents(), step.unless, step.only_if, step.wait_for, step.then, step.else_)


def inflight_changes(
    enrollments: Iterable[LiveEnrollment],
    *,
    current: Playbook,
    new: Playbook,
    stage_now: Mapping[int, tuple[Stage, Stage]],
) -> list[InflightChange]:
    """The active enrollments the new playbook treats differently from the current one.

    ``stage_now``: per lead, the stage the first cycle under each playbook would put it in
    (current, new). An enrollment is affected when the new playbook removes its sequence,
    moves its lead out of the enrollment's stage (where the current one keeps it there),
    removes the step in flight, or changes (removes, replaces or edits) the step to come.
    """
    changes: list[InflightChange] = []
    for live in enrollments:

        def found(change: str, detail: str, live: LiveEnrollment = live) -> None:
            changes.append(InflightChange(live.id, live.email, live.sequence, change, detail))

        old_seq, new_seq = current.sequences.get(live.sequence), new.sequences.get(live.sequence)
        stages = stage_now.get(live.lead_id)
        if new_seq is None:
            found("sequence removed", "the enrollment ends (exited); nothing more is sent")
            continue
        if stages is not None and stages[0] == live.stage and stages[1] != live.stage:
            found(
                "stage change ends it",
                f"the lead would move {live.stage} → {stages[1]}: the enrollment ends, a queued email is cancelled",
            )
            continue
        if live.next_due_at is None and live.steps_done:
            in_flight = live.steps_done[-1]
            if step_now(current, live.sequence, in_flight) and not step_now(new, live.sequence, in_flight):
                found("queued email cancelled", f"step {in_flight} is removed: its queued email is not sent")
                continue
        before = next_step(old_seq, live.steps_done, live.branches) if old_seq is not None else None
        after = next_step(new_seq, live.steps_done, live.branches)
        if before is None and after is None:
            continue
        if after is None:
            assert before is not None
            found("next step removed", f"step {before[1].id} is not sent: the enrollment completes")
        elif before is None:
            found("next step added", f"step {after[1].id} is sent next (nothing was left)")
        elif before[1].id != after[1].id:
            found("next step changed", f"step {after[1].id} is sent next instead of {before[1].id}")
        elif _step_label(before[1]) != _step_label(after[1]):
            found("next step edited", f"step {after[1].id} is sent next as the new playbook has it")
    return changes


def step_order(*playbooks: Playbook) -> dict[tuple[str, str], tuple[int, int]]:
    """Where each (sequence, step) stands, for listing steps as the playbooks have them (the first given wins)."""
    order: dict[tuple[str, str], tuple[int, int]] = {}
    names: list[str] = []
    for playbook in playbooks:
        names.extend(n for n in playbook.sequences if n not in names)
    for playbook in playbooks:
        for name, sequence in playbook.sequences.items():
            for position, step in enumerate(sequence.steps):
                order.setdefault((name, step.id), (names.index(name), position))
    return order


def _email_reason(outcome: Outcome, reason: str | None) -> str:
    if not reason:
        return outcome.value
    return reason if reason.startswith(f"{outcome.value}:") else f"{outcome.value}: {reason}"


@dataclass
class Impact:
    """Every lead's two replays, summed up; ``since`` starts the window the emails and transitions count in."""

    since: datetime
    now: datetime
    current_version: str
    new_version: str
    top: int = 10
    # (sequence, step) → its place in the playbooks (see ``step_order``); steps not in it come last.
    order: Mapping[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    leads: int = 0
    stage_differs: int = 0
    emails_differ: int = 0
    matrix: Counter[tuple[Stage, Stage]] = field(default_factory=Counter)
    stages: dict[str, Counter[Stage]] = field(default_factory=lambda: {s: Counter() for s in SIDES})
    transitions: dict[str, Counter[tuple[Stage, Stage]]] = field(default_factory=lambda: {s: Counter() for s in SIDES})
    # (sequence, step) → side → outcome → count; and the reasons of those not sent.
    emails: dict[tuple[str, str], dict[str, Counter[Outcome]]] = field(default_factory=dict)
    reasons: dict[tuple[str, str], dict[str, Counter[str]]] = field(default_factory=dict)
    # sequence → side → state of the enrollments started in the window (skipped: refused by reentry).
    enrollments: dict[str, dict[str, Counter[str]]] = field(default_factory=dict)
    # The stage changes the first cycle under each playbook would make (current target → new target).
    go_live: Counter[tuple[Stage, Stage]] = field(default_factory=Counter)
    inflight: Counter[tuple[str, str]] = field(default_factory=Counter)
    inflight_shown: list[InflightChange] = field(default_factory=list)
    _most: list[tuple[tuple[int, int, float, int], LeadDifference]] = field(default_factory=list)

    def add(self, lead: LeadHistory, current: LeadRun, new: LeadRun) -> None:
        """Count one lead's two replays."""
        self.leads += 1
        runs = dict(zip(SIDES, (current, new), strict=True))
        sent: dict[str, int] = {}
        for side, run in runs.items():
            self.stages[side][run.stage] += 1
            for change in run.transitions:
                if change.at >= self.since:
                    self.transitions[side][(change.from_stage, change.to_stage)] += 1
            for email in run.emails:
                if email.at < self.since:
                    continue
                key = (email.sequence, email.step_id)
                self.emails.setdefault(key, {s: Counter() for s in SIDES})[side][email.outcome] += 1
                if email.outcome != Outcome.sent:
                    reasons = self.reasons.setdefault(key, {s: Counter() for s in SIDES})
                    reasons[side][_email_reason(email.outcome, email.reason)] += 1
            sent[side] = sum(1 for e in run.emails if e.at >= self.since and e.outcome == Outcome.sent)
            for enrollment in run.enrollments:
                if enrollment.started_at >= self.since:
                    counts = self.enrollments.setdefault(enrollment.sequence, {s: Counter() for s in SIDES})
                    counts[side][enrollment.state.value] += 1
                    if enrollment.state != EnrollmentState.skipped:
                        counts[side]["started"] += 1
        if current.stage != new.stage:
            self.stage_differs += 1
            self.matrix[(current.stage, new.stage)] += 1
        if self._window_emails(current) != self._window_emails(new):
            self.emails_differ += 1
        difference = LeadDifference(
            lead.id, lead.email, (current.stage, new.stage), (current.score, new.score), (sent["current"], sent["new"])
        )
        rank = difference.rank
        if rank[:3] == (0, 0, 0.0) or self.top <= 0:
            return
        if len(self._most) < self.top:
            heapq.heappush(self._most, (rank, difference))
        elif rank > self._most[0][0]:
            heapq.heapreplace(self._most, (rank, difference))

    def _window_emails(self, run: LeadRun) -> Counter[tuple[str, str, Outcome]]:
        return Counter((e.sequence, e.step_id, e.outcome) for e in run.emails if e.at >= self.since)

    def add_go_live(self, stages: Mapping[int, tuple[Stage, Stage]]) -> None:
        """Count where the first cycle under each playbook would put the leads, where they differ."""
        for current, new in stages.values():
            if current != new:
                self.go_live[(current, new)] += 1

    def add_inflight(self, changes: Iterable[InflightChange]) -> None:
        for change in changes:
            self.inflight[(change.sequence, change.change)] += 1
            if len(self.inflight_shown) < MAX_INFLIGHT_SHOWN:
                self.inflight_shown.append(change)

    @property
    def most_affected(self) -> list[LeadDifference]:
        return [d for _, d in sorted(self._most, key=lambda item: item[0], reverse=True)]

    @property
    def changed(self) -> bool:
        """Whether the new playbook makes any difference the simulation can see."""
        return bool(self.stage_differs or self.emails_differ or self.go_live or self.inflight)

    def email_rows(self) -> list[dict[str, Any]]:
        """Per sequence and step: each outcome's count under each playbook and the difference."""
        rows = []
        last = (len(self.order) + 1, 0)
        for (sequence, step), sides in sorted(self.emails.items(), key=lambda i: (self.order.get(i[0], last), i[0])):
            row: dict[str, Any] = {"sequence": sequence, "step": step}
            for outcome in Outcome:
                before, after = sides["current"][outcome], sides["new"][outcome]
                row[outcome.value] = {"current": before, "new": after, "difference": after - before}
            reasons = self.reasons.get((sequence, step))
            row["not_sent_because"] = (
                {side: dict(sorted(reasons[side].items())) for side in SIDES} if reasons else {s: {} for s in SIDES}
            )
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        def pairs(counts: Counter[tuple[Stage, Stage]]) -> list[dict[str, Any]]:
            return [{"from": a.value, "to": b.value, "leads": n} for (a, b), n in sorted(counts.items())]

        return {
            "window": {"since": self.since.isoformat(), "now": self.now.isoformat()},
            "playbooks": {"current": self.current_version, "new": self.new_version},
            "leads": self.leads,
            "leads_in_another_stage": self.stage_differs,
            "leads_with_other_emails": self.emails_differ,
            "stage_matrix": pairs(self.matrix),
            "stages": {side: {s.value: self.stages[side][s] for s in Stage} for side in SIDES},
            "transitions": {
                side: [
                    {"from": a.value, "to": b.value, "count": n} for (a, b), n in sorted(self.transitions[side].items())
                ]
                for side in SIDES
            },
            "emails": self.email_rows(),
            "emails_total": {
                outcome.value: {side: sum(sides[side][outcome] for sides in self.emails.values()) for side in SIDES}
                for outcome in Outcome
            },
            "enrollments": {
                sequence: {side: dict(sorted(sides[side].items())) for side in SIDES}
                for sequence, sides in sorted(self.enrollments.items())
            },
            "go_live": pairs(self.go_live),
            "in_flight": {
                "affected": sum(self.inflight.values()),
                "by_change": [
                    {"sequence": seq, "change": change, "enrollments": n}
                    for (seq, change), n in sorted(self.inflight.items())
                ],
                "examples": [c.to_json() for c in self.inflight_shown],
            },
            "most_affected": [d.to_json() for d in self.most_affected],
        }
