"""Sequence timing and the keys that make a queued message impossible to duplicate."""

from __future__ import annotations

from datetime import timedelta

from nurture.playbook import Playbook, Stage
from nurture.sequences import exits_on_transition, idempotency_key, plan_sequence
from tests.conftest import T0


def test_steps_are_due_after_their_delay_from_enrollment(playbook: Playbook) -> None:
    planned = plan_sequence(playbook, "welcome", started_at=T0)
    assert [(p.step, p.template, p.due_at - T0) for p in planned] == [
        (0, "welcome", timedelta(0)),
        (1, "case_study", timedelta(days=3)),
        (2, "webinar_invite", timedelta(days=7)),
    ]


def test_idempotency_keys_differ_per_step_transition_and_lead() -> None:
    keys = {
        idempotency_key(lead_id=lead, sequence="welcome", transition_id=t, step=s)
        for lead in (1, 2)
        for t in (10, 11)
        for s in (0, 1, 2)
    }
    assert len(keys) == 12
    assert idempotency_key(lead_id=1, sequence="welcome", transition_id=10, step=0) == idempotency_key(
        lead_id=1, sequence="welcome", transition_id=10, step=0
    )


def test_leaving_the_stage_exits_the_sequence() -> None:
    assert exits_on_transition(Stage.warm, Stage.hot)
    assert exits_on_transition(Stage.hot, Stage.customer)
    assert not exits_on_transition(Stage.hot, Stage.hot)
