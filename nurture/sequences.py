"""Nurture sequences: which a transition starts, when each step is due, when to exit.

A transition enrolls the lead in every sequence bound to it and queues all of
its steps at once, each with a due time and a unique idempotency key, so the
message rows created in the transition's database transaction are the whole
promise. Leaving the sequence's stage exits the enrollment and cancels what is
still queued.

Pure: no clock, no database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from nurture.playbook import Playbook, Stage


@dataclass(frozen=True, slots=True)
class PlannedMessage:
    """One step of a sequence, scheduled for a lead."""

    sequence: str
    step: int
    template: str
    subject: str
    due_at: datetime


def plan_sequence(playbook: Playbook, sequence: str, *, started_at: datetime) -> list[PlannedMessage]:
    """Every step of ``sequence`` with its due time, counted from ``started_at``."""
    steps = playbook.sequences[sequence].steps
    return [
        PlannedMessage(
            sequence=sequence,
            step=index,
            template=step.template,
            subject=step.subject,
            due_at=started_at + step.after,
        )
        for index, step in enumerate(steps)
    ]


def enrollment_key(*, lead_id: int, sequence: str, transition_id: int) -> str:
    """Identifies an enrollment: one per lead, sequence and transition."""
    return f"lead-{lead_id}/{sequence}/transition-{transition_id}"


def idempotency_key(*, lead_id: int, sequence: str, transition_id: int, step: int) -> str:
    """The unique key of one message: a replayed cycle can never queue it twice."""
    return f"{enrollment_key(lead_id=lead_id, sequence=sequence, transition_id=transition_id)}/step-{step}"


def exits_on_transition(enrolled_stage: Stage, new_stage: Stage) -> bool:
    """An enrollment ends when the lead leaves the stage it was enrolled for."""
    return enrolled_stage != new_stage
