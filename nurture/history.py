"""What ``nurture simulate`` replays, and what a replay gives back, as plain values.

A lead's stored history and the live enrollments: ``db/`` loads these in set-based batches,
:mod:`nurture.simulation` replays them under a playbook and returns a :class:`LeadRun`. They
live apart from the simulator so the database layer can build them without importing the
contact policy.

Pure: no clock, no database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from nurture.playbook import Stage
from nurture.scoring import LeadScoreState
from nurture.sequences import Branch, EnrollmentState

# Stored event kinds of a person opening and clicking an email (an Apple Mail machine open is another kind).
OPEN, CLICK = "email_open", "email_click"


@dataclass(frozen=True, slots=True)
class PastEvent:
    """One stored event; for a person's open or click of an email, the sequence and step of that email."""

    kind: str
    occurred_at: datetime
    email_step: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class LeadHistory:
    """A lead as the simulation starts it: its profile now, when it arrived, its events (oldest first),
    since when its address is suppressed without an event saying so (a manual suppression), and where
    it stands in the live database (for what the first rescore under a new playbook would do)."""

    id: int
    email: str
    profile: Mapping[str, Any]
    timezone: str
    created_at: datetime
    events: tuple[PastEvent, ...]
    live_stage: Stage
    live_score: LeadScoreState
    suppressed_since: datetime | None = None

    @property
    def starts_at(self) -> datetime:
        """When the lead's replay starts: its arrival, or its first event if that came before."""
        if self.events and self.events[0].occurred_at < self.created_at:
            return self.events[0].occurred_at
        return self.created_at


@dataclass(frozen=True, slots=True)
class LiveEnrollment:
    """An active enrollment in the live database, as a new playbook would find it."""

    id: int
    lead_id: int
    email: str
    sequence: str
    stage: Stage
    steps_done: tuple[str, ...]
    branches: tuple[Branch, ...]
    # None while its last step is in flight (a message queued, not yet settled).
    next_due_at: datetime | None


class Outcome(StrEnum):
    """What became of a step the replay decided."""

    sent = "sent"
    # Its unless / only_if ruled it out.
    skipped = "skipped"
    # Its enrollment ended before it went out: the lead left the stage, or reached the goal.
    cancelled = "cancelled"
    # The address was suppressed (unsubscribe, bounce, spam report, by hand).
    suppressed = "suppressed"
    # Decided, and held by the contact policy when the replay ends.
    queued = "queued"


@dataclass(frozen=True, slots=True)
class StepOutcome:
    sequence: str
    step_id: str
    outcome: Outcome
    at: datetime
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class StageChange:
    from_stage: Stage
    to_stage: Stage
    at: datetime


@dataclass(frozen=True, slots=True)
class EnrollmentOutcome:
    """An enrollment the replay started (or refused: ``skipped``), and how it stood at the end."""

    sequence: str
    started_at: datetime
    state: EnrollmentState
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class LeadRun:
    """One lead replayed under one playbook up to ``now``."""

    stage: Stage
    score: float
    transitions: tuple[StageChange, ...]
    emails: tuple[StepOutcome, ...]
    enrollments: tuple[EnrollmentOutcome, ...]
