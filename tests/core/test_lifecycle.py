"""The lifecycle chart: every legal move, every illegal one, and hysteresis at the thresholds."""

from __future__ import annotations

import itertools

import pytest

from nurture.lifecycle import StageHolder, TransitionNotAllowed, move, target_stage, transition_table
from nurture.playbook import Playbook, Stage

LEGAL = {
    (Stage.cold, Stage.warm),
    (Stage.cold, Stage.hot),
    (Stage.cold, Stage.customer),
    (Stage.warm, Stage.cold),
    (Stage.warm, Stage.hot),
    (Stage.warm, Stage.customer),
    (Stage.hot, Stage.cold),
    (Stage.hot, Stage.warm),
    (Stage.hot, Stage.customer),
}


def test_transition_table_snapshot() -> None:
    """A change here changes who gets which email: make it on purpose, with this snapshot."""
    assert transition_table() == [
        ("cold", "convert", "customer"),
        ("cold", "heat_up", "hot"),
        ("cold", "warm_up", "warm"),
        ("hot", "convert", "customer"),
        ("hot", "cool_down", "cold"),
        ("hot", "warm_up", "warm"),
        ("warm", "convert", "customer"),
        ("warm", "cool_down", "cold"),
        ("warm", "heat_up", "hot"),
    ]


@pytest.mark.parametrize(("source", "target"), sorted(LEGAL))
def test_every_legal_move_updates_the_stage(source: Stage, target: Stage) -> None:
    holder = StageHolder(stage=source.value)
    assert move(holder, target) == (source, target)
    assert holder.stage == target.value


ILLEGAL = sorted(set(itertools.product(Stage, Stage)) - LEGAL)


@pytest.mark.parametrize(("source", "target"), ILLEGAL)
def test_every_illegal_move_raises_and_leaves_the_stage(source: Stage, target: Stage) -> None:
    holder = StageHolder(stage=source.value)
    with pytest.raises(TransitionNotAllowed):
        move(holder, target)
    assert holder.stage == source.value


def test_customer_is_final_and_purchase_wins_from_anywhere(playbook: Playbook) -> None:
    for stage in (Stage.cold, Stage.warm, Stage.hot):
        assert target_stage(0, stage, playbook.stages, purchased=True) == Stage.customer
    assert target_stage(-100, Stage.customer, playbook.stages) == Stage.customer


@pytest.mark.parametrize(
    ("score", "current", "expected"),
    [
        (39.9, Stage.cold, Stage.cold),  # below warm.enter_at 40
        (40.0, Stage.cold, Stage.warm),  # enter warm
        (30.0, Stage.warm, Stage.warm),  # hysteresis: stays until below 30
        (29.9, Stage.warm, Stage.cold),
        (75.0, Stage.cold, Stage.hot),  # skip cold → hot
        (74.9, Stage.warm, Stage.warm),
        (60.0, Stage.hot, Stage.hot),  # stays hot until below 60
        (59.9, Stage.hot, Stage.warm),
        (29.0, Stage.hot, Stage.cold),  # hot straight to cold
        (35.0, Stage.hot, Stage.warm),  # hot falling into the warm band keeps warm's hysteresis
    ],
)
def test_thresholds_with_hysteresis(playbook: Playbook, score: float, current: Stage, expected: Stage) -> None:
    assert target_stage(score, current, playbook.stages) == expected


def test_a_lead_hovering_at_a_threshold_does_not_flap(playbook: Playbook) -> None:
    stage = Stage.cold
    moves = 0
    for score in [39, 41, 38, 40.5, 36, 42, 33, 39.9, 31]:
        new = target_stage(score, stage, playbook.stages)
        moves += new != stage
        stage = new
    assert moves == 1
    assert stage == Stage.warm
