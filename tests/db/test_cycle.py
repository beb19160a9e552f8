"""The cycle on a real database (SQLite and PostgreSQL): scores, transitions, enrollments, exits."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from sqlalchemy import Engine

from db.cycle import count_leads_to_advance, next_lead_ids
from db.engine import session_scope
from db.models import StageTransition
from flows.advancing import advance_leads
from nurture.playbook import Playbook
from nurture.scoring import ActivityEvent, event_points
from tests.conftest import T0
from tests.db.world import World

ANN = "ann@northwind.example"
HOUR = timedelta(hours=1)


@pytest.fixture
def world(engine: Engine, playbook: Playbook) -> World:
    return World(engine, playbook)


def _warm_up(world: World) -> None:
    world.lead(ANN, at=T0, first_name="Ann", job_title="Head of Data", company_size=200, country="US")
    world.events(ANN, ("form_submit", T0), ("pricing_view", T0 + timedelta(minutes=5)))


def test_a_lead_that_warms_up_is_enrolled_and_its_emails_are_queued(world: World) -> None:
    _warm_up(world)
    result = world.advance(T0 + timedelta(hours=1))
    lead = world.row(ANN)
    assert lead.stage == "warm"
    assert lead.score == pytest.approx(15 + 10 + 5 + (10 + 6) * 2 ** (-1 / (14 * 24)), rel=1e-3)
    assert dict(result.transitions) == {"cold→warm": 1}
    (transition,) = world.all(StageTransition)
    assert transition.reason.startswith(f"score {lead.score:.1f} reached warm.enter_at 40")
    assert transition.playbook_version == world.playbook.version
    (enrollment,) = world.enrollments(ANN)
    assert (enrollment.sequence, enrollment.state, enrollment.transition_id) == ("welcome", "active", transition.id)
    # Only the first step is decided (its after is 0h): the next ones wait for it to be sent.
    (message,) = world.messages(ANN)
    assert (message.step, message.step_id, message.status, message.due_at) == (0, "welcome", "queued", T0 + HOUR)
    assert (enrollment.steps_done, enrollment.next_due_at) == (["welcome"], None)
    (change,) = world.ledger(ANN)
    assert change.old_score == 0
    assert change.new_score == pytest.approx(lead.score)
    assert sum(change.contributions.values()) == pytest.approx(lead.score, abs=1e-3)
    assert set(change.contributions) == {
        "fit: decision maker",
        "fit: mid-market or larger",
        "fit: target market",
        "event: form_submit",
        "event: pricing_view",
    }


def test_running_the_same_cycle_again_changes_nothing(world: World) -> None:
    _warm_up(world)
    now = T0 + timedelta(hours=1)
    world.advance(now)
    before = (world.transitions(ANN), len(world.messages(ANN)), len(world.ledger(ANN)))
    again = world.advance(now)
    assert again.leads == 0
    assert (world.transitions(ANN), len(world.messages(ANN)), len(world.ledger(ANN))) == before


def test_a_cycle_touches_only_the_leads_that_changed(world: World) -> None:
    for i in range(120):
        world.lead(f"lead{i}@example.com", at=T0, company_size=10)
    assert world.advance(T0).leads == 120
    world.events("lead7@example.com", ("page_view", T0 + timedelta(hours=1)))
    with session_scope(world.engine) as session:
        assert count_leads_to_advance(session=session, now=T0 + timedelta(hours=2)) == 1
        assert len(next_lead_ids(session=session, now=T0 + timedelta(hours=2), after_id=0, limit=50)) == 1


def test_events_in_the_future_wait_for_their_time(world: World) -> None:
    _warm_up(world)
    world.events(
        ANN, ("demo_request", T0 + timedelta(days=2)), ("webinar_attended", T0 + timedelta(days=2)), received=T0
    )
    world.advance(T0 + timedelta(hours=1))
    assert world.row(ANN).stage == "warm"
    world.advance(T0 + timedelta(days=2, hours=1))
    assert world.row(ANN).stage == "hot"


def test_decay_alone_cools_a_lead_and_exits_its_sequence(world: World) -> None:
    world.lead(ANN, at=T0, first_name="Ann", job_title="Head of Data", company_size=200)  # fit 25
    world.events(ANN, ("form_submit", T0), ("pricing_view", T0 + timedelta(minutes=5)))
    world.advance(T0 + timedelta(hours=1))
    world.dispatch(T0 + timedelta(hours=1))
    assert world.row(ANN).stage == "warm"
    # The first review is where decay takes the score below warm.enter_at: hysteresis keeps it warm.
    review = world.row(ANN).next_review_at
    assert review is not None
    assert world.advance(review - timedelta(minutes=1)).leads == 0  # not due: not even looked at
    world.advance(review)
    assert world.row(ANN).stage == "warm"
    # The next is where it falls below warm.leave_below.
    review = world.row(ANN).next_review_at
    assert review is not None
    world.advance(review)
    lead = world.row(ANN)
    assert lead.stage == "cold"
    assert lead.score < world.playbook.stages.warm.leave_below
    assert world.transitions(ANN) == [("cold", "warm"), ("warm", "cold")]
    welcome, win_back = world.enrollments(ANN)
    assert (welcome.state, welcome.exit_reason) == ("exited", "lead left warm for cold")
    assert win_back.sequence == "win_back"
    statuses = {m.template: m.status for m in world.messages(ANN)}
    assert statuses.pop("welcome") == "sent"
    # What the welcome had decided and not sent was cancelled; nothing of it is left queued.
    assert set(statuses.values()) <= {"cancelled"}
    assert (win_back.state, win_back.next_due_at) == ("active", review + timedelta(days=2))


def test_a_purchase_makes_a_customer_who_never_leaves(world: World) -> None:
    _warm_up(world)
    world.advance(T0 + timedelta(hours=1))
    world.events(ANN, ("purchase", T0 + timedelta(days=1)))
    world.advance(T0 + timedelta(days=1, hours=1))
    assert world.row(ANN).stage == "customer"
    assert world.transitions(ANN)[-1] == ("warm", "customer")
    assert world.row(ANN).next_review_at is None
    world.events(ANN, ("bounce", T0 + timedelta(days=2)), ("unsubscribe", T0 + timedelta(days=2)))
    world.advance(T0 + timedelta(days=90))
    assert world.row(ANN).stage == "customer"
    assert [e.sequence for e in world.enrollments(ANN)] == ["welcome", "onboarding"]


def test_a_cold_lead_can_jump_straight_to_hot(world: World) -> None:
    world.lead(ANN, at=T0, job_title="CTO", company_size=500)
    world.events(ANN, ("demo_request", T0), ("webinar_attended", T0), ("pricing_view", T0))
    world.advance(T0 + timedelta(minutes=30))
    assert world.transitions(ANN) == [("cold", "hot")]
    assert [e.sequence for e in world.enrollments(ANN)] == ["demo_offer"]


def test_daily_caps_hold_across_cycles(world: World) -> None:
    world.lead(ANN, at=T0)
    world.events(ANN, *[("page_view", T0 + timedelta(minutes=i)) for i in range(8)])
    world.advance(T0 + timedelta(hours=1))
    world.events(ANN, *[("page_view", T0 + timedelta(hours=2, minutes=i)) for i in range(8)])
    world.advance(T0 + timedelta(hours=3))
    assert world.row(ANN).engagement == pytest.approx(10, abs=0.1)  # 16 views, 10 counted, a little decay


def test_stored_engagement_equals_a_replay_of_all_events(world: World, playbook: Playbook) -> None:
    world.lead(ANN, at=T0)
    kinds = ["page_view", "email_click", "pricing_view", "form_submit", "bounce"]
    events = [(kinds[i % 5], T0 + timedelta(hours=7 * i)) for i in range(40)]
    for day in range(12):
        todays = [e for e in events if T0 + timedelta(days=day) <= e[1] < T0 + timedelta(days=day + 1)]
        if todays:
            world.events(ANN, *todays)
        world.advance(T0 + timedelta(days=day + 1))
    end = T0 + timedelta(days=12)
    replay = event_points([ActivityEvent(k, t) for k, t in events], playbook.scoring, end).total
    lead = world.row(ANN)
    assert lead.scored_at == end
    assert lead.engagement == pytest.approx(replay, rel=1e-6)


def test_a_profile_update_rescores_the_lead(world: World) -> None:
    world.lead(ANN, at=T0, company_size=5)
    world.advance(T0)
    assert world.row(ANN).fit_score == 0
    world.lead(ANN, at=T0 + timedelta(days=1), company_size=80)
    world.advance(T0 + timedelta(days=1))
    assert world.row(ANN).fit_score == 10
    assert world.ledger(ANN)[-1].contributions == {"fit (profile changed)": 10}


def test_an_overlapping_cycle_keeps_the_ledger_in_step_with_the_score(world: World) -> None:
    """A second cycle that picked the same leads before the first committed re-advances them a minute later."""
    _warm_up(world)
    first = T0 + timedelta(hours=1)
    with session_scope(world.engine) as session:
        ids = next_lead_ids(session=session, now=first, after_id=0, limit=100)
    for at in (first, first + timedelta(minutes=1)):  # the overlapping cycle's stale list, a little later
        with session_scope(world.engine) as session:
            advance_leads(session=session, lead_ids=ids, playbook=world.playbook, now=at)
    lead, ledger = world.row(ANN), world.ledger(ANN)
    assert ledger[-1].new_score == pytest.approx(lead.score, abs=1e-9)
    assert ledger[-1].contributions.keys() == {"decay"}
    for earlier, later in itertools.pairwise(ledger):
        assert later.old_score == pytest.approx(earlier.new_score, abs=1e-9)
