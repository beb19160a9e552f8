"""Advancing a chunk of leads: new scores, their ledger rows, and the stage changes they call for.

The cycle's planner: it takes plain snapshots of the leads and their new
events and returns what to write. ``db/`` loads the snapshots and persists the
plan in one transaction; transitions then start enrollments
(:func:`nurture.sequences.plan_enrollments`).

Pure: no clock, no database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import cache
from typing import Any

from nurture.errors import NurtureError
from nurture.lifecycle import (
    StageHolder,
    TransitionNotAllowed,
    move,
    review_thresholds,
    target_stage,
    transition_reason,
)
from nurture.playbook import Playbook, Stage
from nurture.scoring import NO_POINTS, ActivityEvent, EventPoints, LeadScoreState, next_review_at, rescore


@dataclass(frozen=True, slots=True)
class LeadSnapshot:
    """A lead as the cycle needs it: where it stands and its profile (``PROFILE_COLUMNS`` of ``db``)."""

    id: int
    stage: Stage
    score: LeadScoreState
    profile: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class LeadScore:
    """A lead's new score, stage and next review, as written back."""

    lead_id: int
    fit: float
    engagement: float
    score: float
    stage: Stage
    next_review_at: datetime | None


@dataclass(frozen=True, slots=True)
class ScoreMove:
    """A ledger row: a change of the stored score and the rules that made it."""

    lead_id: int
    old_score: float
    new_score: float
    contributions: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class StageMove:
    """A stage change the lead's score (or a purchase, or an operator) calls for."""

    lead_id: int
    from_stage: Stage
    to_stage: Stage
    score: float
    reason: str


@dataclass
class ChunkPlan:
    scores: list[LeadScore] = field(default_factory=list)
    ledger: list[ScoreMove] = field(default_factory=list)
    moves: list[StageMove] = field(default_factory=list)


def plan_chunk(
    leads: Iterable[LeadSnapshot],
    *,
    events: Mapping[int, Sequence[ActivityEvent]],
    counted: Mapping[int, Counter[tuple[str, date]]],
    playbook: Playbook,
    now: datetime,
    replay: bool = False,
    held: frozenset[int] = frozenset(),
    points: Mapping[int, EventPoints] | None = None,
) -> ChunkPlan:
    """Rescore each lead with its new ``events`` and decide its stage.

    ``counted`` are events already in each score, per kind and day (for daily caps).
    With ``replay`` every event is passed and scores start from zero under the current
    playbook; the ledger then holds one row per moved score. ``held`` leads keep their stage (an
    operator set it and they did nothing since), and decay alone will not review them. ``points``:
    the new events' points per lead as the database summed them (a replay), instead of ``events``.
    """
    plan = ChunkPlan()
    customer_kinds = set(playbook.stages.customer.on_events)
    thresholds = review_thresholds(playbook.stages)
    for lead in leads:
        state = LeadScoreState(score=lead.score.score) if replay else lead.score
        update = rescore(
            state,
            profile=lead.profile,
            new_events=events.get(lead.id, ()),
            scoring=playbook.scoring,
            now=now,
            already_counted=counted.get(lead.id),
            new_points=None if points is None else points.get(lead.id, NO_POINTS),
        )
        purchased = bool(update.kinds_seen & customer_kinds)
        target = target_stage(update.score, lead.stage, playbook.stages, purchased=purchased)
        if lead.id in held:
            target = lead.stage
        review = None
        if target != Stage.customer and lead.id not in held:
            review = next_review_at(
                fit=update.fit,
                engagement=update.engagement,
                now=now,
                half_life=playbook.scoring.half_life,
                thresholds=thresholds,
            )
        plan.scores.append(LeadScore(lead.id, update.fit, update.engagement, update.score, target, review))
        # Every change to the stored score gets its ledger row, however small, so the
        # ledger's last row is always the lead's score.
        moved = abs(update.score - update.old_score) > 1e-9
        contributions: Mapping[str, float] = update.contributions
        if replay and moved:
            # Rule by rule: the new score's fit rules and event kinds (scored from zero), less the score replaced.
            contributions = {
                f"replay under playbook {playbook.version}: previous score": round(-update.old_score, 4),
                **update.contributions,
            }
        if moved or (not replay and (lead.id in events or state.scored_at is None)):
            plan.ledger.append(ScoreMove(lead.id, update.old_score, update.score, contributions))
        if target != lead.stage:
            plan.moves.append(
                StageMove(
                    lead.id,
                    lead.stage,
                    target,
                    update.score,
                    transition_reason(update.score, lead.stage, target, playbook.stages, purchased=purchased),
                )
            )
            check_move(lead.id, lead.stage, target)
    return plan


def check_move(lead_id: int, source: Stage, target: Stage) -> None:
    """Walk the lifecycle state machine: a move it does not allow is a bug, and must name its lead."""
    if not _allowed(source, target):
        raise NurtureError(f"lead {lead_id}: {source} → {target} is not a legal transition")


@cache
def _allowed(source: Stage, target: Stage) -> bool:
    """Whether the state machine takes a lead from ``source`` to ``target``: it depends on nothing else, so
    the machine is walked once per pair (building one costs ~0.5 ms; a replay may move 100,000 leads)."""
    try:
        move(StageHolder(stage=source.value), target)
    except TransitionNotAllowed:
        return False
    return True
