"""The lifecycle of a lead: cold → warm → hot → customer, as a python-statemachine chart.

``target_stage`` decides where a lead belongs from its score (with hysteresis,
so a lead hovering at a threshold does not flap and get a burst of email); the
chart decides whether the move is legal. Leads may skip (cold → hot) and cool
down (hot → warm → cold); ``customer`` is entered from any stage by a purchase
and never left. Illegal moves raise ``TransitionNotAllowed``.

Pure: no clock, no database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from statemachine import StateChart
from statemachine.exceptions import TransitionNotAllowed
from statemachine.states import States

from nurture.playbook import Stage, Stages

__all__ = ["LeadLifecycle", "Stage", "StageHolder", "TransitionNotAllowed", "move", "target_stage"]


class LeadLifecycle(StateChart[Any]):
    """The stage chart; events are named after where they take the lead."""

    # Bugs must raise, not be ignored: see the 3.x defaults of StateChart.
    allow_event_without_transition = False
    catch_errors_as_events = False
    enable_self_transition_entries = False
    atomic_configuration_update = True

    stages = States.from_enum(Stage, initial=Stage.cold, final=Stage.customer, use_enum_instance=False)

    cool_down = stages.warm.to(stages.cold) | stages.hot.to(stages.cold)
    warm_up = stages.cold.to(stages.warm) | stages.hot.to(stages.warm)
    heat_up = stages.cold.to(stages.hot) | stages.warm.to(stages.hot)
    convert = stages.cold.to(stages.customer) | stages.warm.to(stages.customer) | stages.hot.to(stages.customer)


EVENT_FOR_TARGET: dict[Stage, str] = {
    Stage.cold: "cool_down",
    Stage.warm: "warm_up",
    Stage.hot: "heat_up",
    Stage.customer: "convert",
}


@dataclass(slots=True)
class StageHolder:
    """The one field the chart reads and writes; keeps ORM rows off the hot path."""

    stage: str


def move(holder: Any, target: Stage) -> tuple[Stage, Stage]:
    """Move ``holder.stage`` to ``target`` through the chart; returns (from, to).

    Raises ``TransitionNotAllowed`` for a move the lifecycle forbids (leaving
    customer, or a "move" to the stage the lead is already in).
    """
    source = Stage(holder.stage)
    machine = LeadLifecycle(model=holder, state_field="stage")
    machine.send(EVENT_FOR_TARGET[target])
    return source, Stage(holder.stage)


def target_stage(score: float, current: Stage, stages: Stages, *, purchased: bool = False) -> Stage:
    """Where a lead with ``score`` belongs, given where it is now.

    A lead enters warm or hot at ``enter_at`` and stays until its score drops
    below ``leave_below``. A purchase makes it a customer, for good.
    """
    if current == Stage.customer or purchased:
        return Stage.customer
    if score >= stages.hot.enter_at or (current == Stage.hot and score >= stages.hot.leave_below):
        return Stage.hot
    holds_warm = current in (Stage.warm, Stage.hot) and score >= stages.warm.leave_below
    if score >= stages.warm.enter_at or holds_warm:
        return Stage.warm
    return Stage.cold


def review_thresholds(stages: Stages) -> tuple[float, ...]:
    """Scores at which a lead's target stage can change."""
    return (stages.warm.enter_at, stages.warm.leave_below, stages.hot.enter_at, stages.hot.leave_below)


def transition_table() -> list[tuple[str, str, str]]:
    """Every legal (from, event, to) of the chart, for docs and the snapshot test."""
    rows = []
    for state in LeadLifecycle.states:
        for transition in state.transitions:
            for event in transition.events:
                rows.append((str(state.value), str(event), str(transition.target.value)))
    return sorted(rows)


def transition_reason(score: float, source: Stage, target: Stage, stages: Stages, *, purchased: bool) -> str:
    """Why a lead moved, in words a marketer can read in `nurture explain`."""
    if target == Stage.customer:
        return "purchase event" if purchased else "customer"
    if target == Stage.hot:
        return f"score {score:.1f} reached hot.enter_at {stages.hot.enter_at:g}"
    if target == Stage.warm and source == Stage.cold:
        return f"score {score:.1f} reached warm.enter_at {stages.warm.enter_at:g}"
    if target == Stage.warm:
        return f"score {score:.1f} fell below hot.leave_below {stages.hot.leave_below:g}"
    return f"score {score:.1f} fell below warm.leave_below {stages.warm.leave_below:g}"
