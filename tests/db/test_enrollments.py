"""What operators read and write by hand (db/enrollments.py), on SQLite and PostgreSQL, with real cycles around it."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, update
from sqlmodel import col

from db.cycle import all_lead_ids, paused_sequences
from db.engine import session_scope
from db.enrollments import (
    EnrollmentRow,
    EnrollmentSelection,
    Pause,
    SequenceLoad,
    StepInFlight,
    existing_enrollment_ids,
    exit_enrollments,
    lead_exists,
    list_enrollments,
    list_pauses,
    pause_sequence,
    queued_messages,
    resume_sequence,
    sequence_loads,
    unscored_changes,
)
from db.models import Message
from flows.advancing import advance_leads, set_stage
from nurture.errors import NurtureError
from nurture.playbook import Playbook, Stage
from nurture.sequences import EnrollmentState
from nurture.transports import InMemoryTransport
from tests.conftest import T0
from tests.db.test_walking import ANN, HOUR, OPEN_POLICY, playbook_with
from tests.db.world import World

BOB = "bob@northwind.example"


@pytest.fixture
def world(engine: Engine) -> World:
    return World(engine, playbook_with(OPEN_POLICY))


def warm(world: World, email: str, at: datetime) -> None:
    world.lead(email, at=at, first_name="Ann", job_title="Head of Data", company_size=200, country="US")
    world.events(email, ("form_submit", at), ("pricing_view", at))


def rows(world: World, selection: EnrollmentSelection, limit: int | None = None) -> list[EnrollmentRow]:
    with session_scope(world.engine) as session:
        return list(list_enrollments(session=session, selection=selection, limit=limit))


def sent_count(world: World) -> int:
    assert isinstance(world.transport, InMemoryTransport)
    return len(world.transport.sent)


def test_enrollments_are_listed_most_recent_first_with_the_step_in_flight(world: World) -> None:
    warm(world, ANN, T0)
    world.cycle(T0 + HOUR)
    warm(world, BOB, T0 + timedelta(days=1))
    world.cycle(T0 + timedelta(days=1, hours=1))
    case_study_due = T0 + HOUR + timedelta(days=3)
    world.advance(case_study_due)  # Ann's case_study is decided and queued, not yet sent

    bob, ann = rows(world, EnrollmentSelection())
    assert (bob.email, ann.email) == (BOB, ANN)
    assert ann.steps_done == ("welcome", "case_study")
    assert ann.next_due_at is None
    queued = world.messages(ANN)[1]
    assert ann.in_flight == StepInFlight("case_study", queued.id, "queued")
    assert bob.in_flight is None
    assert bob.next_due_at == T0 + timedelta(days=4, hours=1)
    assert [r.email for r in rows(world, EnrollmentSelection(email=ANN))] == [ANN]
    assert [r.email for r in rows(world, EnrollmentSelection(), limit=1)] == [BOB]
    assert rows(world, EnrollmentSelection(sequence="demo_offer")) == []
    assert rows(world, EnrollmentSelection(states=(EnrollmentState.exited,))) == []

    world.dispatch(case_study_due)
    [ann] = rows(world, EnrollmentSelection(email=ANN))
    assert ann.in_flight is None
    assert ann.next_due_at == case_study_due + timedelta(days=4)
    with session_scope(world.engine) as session:
        assert lead_exists(session=session, email=ANN)
        assert not lead_exists(session=session, email="nobody@northwind.example")
        assert existing_enrollment_ids(session=session, ids=[1, 2, 999]) == {1, 2}


def test_an_exit_cancels_the_queued_step_and_nothing_follows(world: World) -> None:
    warm(world, ANN, T0)
    warm(world, BOB, T0)
    world.cycle(T0 + HOUR)
    due = T0 + HOUR + timedelta(days=3)
    world.advance(due)
    [ann] = world.enrollments(ANN)
    [bob] = world.enrollments(BOB)
    # Bob's case_study is already with a dispatcher: an exit leaves it to it.
    with session_scope(world.engine) as session:
        session.execute(
            update(Message)
            .where(col(Message.enrollment_id) == bob.id, col(Message.status) == "queued")
            .values(status="claimed")
        )
        assert queued_messages(session=session, enrollment_ids=[ann.id, bob.id]) == 1
        result = exit_enrollments(session=session, ids=[ann.id, bob.id], reason="asked for a call", now=due)
    assert result.exited == (ann.id, bob.id)
    assert (result.messages_cancelled, result.with_dispatcher) == (1, 1)
    [ann] = world.enrollments(ANN)
    assert (ann.state, ann.exit_reason, ann.ended_at, ann.next_due_at) == (
        "exited",
        "operator: asked for a call",
        due,
        None,
    )
    cancelled = world.messages(ANN)[1]
    assert (cancelled.step_id, cancelled.status) == ("case_study", "cancelled")
    assert cancelled.last_error == "enrollment exited by an operator: asked for a call"
    # Again: nothing is active any more, so nothing changes (the first reason stays).
    with session_scope(world.engine) as session:
        again = exit_enrollments(session=session, ids=[ann.id], reason="twice", now=due + HOUR)
    assert again.exited == ()
    assert world.enrollments(ANN)[0].exit_reason == "operator: asked for a call"
    before = sent_count(world)
    for day in range(1, 12):
        world.cycle(due + timedelta(days=day))
    assert sent_count(world) == before
    assert [m.step_id for m in world.messages(ANN)] == ["welcome", "case_study"]


def test_an_exit_leaves_an_enrollment_that_ended_meanwhile_as_it_was(world: World) -> None:
    warm(world, ANN, T0)
    for day in range(12):
        world.cycle(T0 + HOUR + timedelta(days=day))
    [ann] = world.enrollments(ANN)
    assert ann.state == "completed"
    with session_scope(world.engine) as session:
        result = exit_enrollments(session=session, ids=[ann.id], reason="too late", now=T0 + timedelta(days=20))
    assert result.exited == ()
    assert world.enrollments(ANN)[0].state == "completed"


def test_a_pause_is_kept_once_and_resume_lifts_it(world: World) -> None:
    with session_scope(world.engine) as session:
        first = pause_sequence(session=session, name="welcome", reason="copy review", now=T0)
    with session_scope(world.engine) as session:
        second = pause_sequence(session=session, name="welcome", reason="another reason", now=T0 + HOUR)
        assert paused_sequences(session=session) == {"welcome"}
        assert list_pauses(session=session) == [Pause("welcome", T0, "copy review")]
    assert first.created
    assert not second.created
    assert second.pause == Pause("welcome", T0, "copy review")
    with session_scope(world.engine) as session:
        assert resume_sequence(session=session, name="welcome") == Pause("welcome", T0, "copy review")
        assert resume_sequence(session=session, name="welcome") is None
        assert list_pauses(session=session) == []


def test_queued_messages_of_a_paused_sequence_wait_and_go_after_resume(world: World) -> None:
    warm(world, ANN, T0)
    world.cycle(T0 + HOUR)
    warm(world, BOB, T0 + timedelta(days=1))
    world.cycle(T0 + timedelta(days=1, hours=1))
    due = T0 + HOUR + timedelta(days=3)
    world.advance(due)  # Ann's case_study queued
    with session_scope(world.engine) as session:
        pause_sequence(session=session, name="welcome", reason=None, now=due)
    before = sent_count(world)
    for day in range(6):
        world.cycle(due + timedelta(days=day))
    assert sent_count(world) == before
    assert world.messages(ANN)[1].status == "queued"
    assert [m.step_id for m in world.messages(BOB)] == ["welcome"]  # Bob's case_study came due: not decided
    later = due + timedelta(days=6)
    with session_scope(world.engine) as session:
        loads = sequence_loads(session=session, now=later)
        assert loads == {"welcome": SequenceLoad(active=2, due=1, in_flight=1, queued_messages=1)}
        assert sequence_loads(session=session, now=later, names=["demo_offer"]) == {}
        resume_sequence(session=session, name="welcome")
    world.cycle(later)
    assert [m.status for m in world.messages(ANN)] == ["sent", "sent"]
    assert [m.step_id for m in world.messages(BOB)] == ["welcome", "case_study"]


def test_changes_not_yet_scored_are_counted(world: World) -> None:
    world.lead(ANN, at=T0, first_name="Ann")
    with session_scope(world.engine) as session:
        assert unscored_changes(session=session, email=ANN, now=T0) == 1  # a new lead: its profile
    world.cycle(T0 + HOUR)
    world.events(ANN, ("page_view", T0 + 2 * HOUR), ("page_view", T0 + 3 * HOUR))
    with session_scope(world.engine) as session:
        assert unscored_changes(session=session, email=ANN, now=T0 + 2 * HOUR) == 1
        assert unscored_changes(session=session, email=ANN, now=T0 + 3 * HOUR) == 2
        assert unscored_changes(session=session, email="nobody@northwind.example", now=T0) == 0


# A stage set by hand holds until the lead's next event or profile change: through the next
# cycle (its pending activity is scored first) and through rescore-all.


def test_a_manual_reason_too_long_to_store_is_refused_clearly(world: World, playbook: Playbook) -> None:
    warm(world, ANN, T0)
    world.cycle(T0 + HOUR)
    with pytest.raises(NurtureError), session_scope(world.engine) as session:
        set_stage(session=session, email=ANN, stage=Stage.hot, reason="x" * 600, playbook=playbook, now=T0 + 2 * HOUR)


def test_the_leads_next_event_lets_the_thresholds_apply_again(world: World) -> None:
    warm(world, ANN, T0)
    world.cycle(T0 + HOUR)
    with session_scope(world.engine) as session:
        set_stage(
            session=session, email=ANN, stage=Stage.hot, reason="call", playbook=world.playbook, now=T0 + 2 * HOUR
        )
    world.events(ANN, ("page_view", T0 + 3 * HOUR))
    # Its score (about 42) is below hot.leave_below: the next cycle moves it back, the rule says why.
    world.cycle(T0 + 4 * HOUR)
    assert world.row(ANN).stage == "warm"
    assert world.transitions(ANN) == [("cold", "warm"), ("warm", "hot"), ("hot", "warm")]
    with session_scope(world.engine) as session:
        ids = all_lead_ids(session=session, after_id=0, limit=100)
        advance_leads(session=session, lead_ids=ids, playbook=world.playbook, now=T0 + 5 * HOUR, replay=True)
    assert world.row(ANN).stage == "warm"
