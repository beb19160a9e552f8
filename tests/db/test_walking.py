"""Sequences walked one step at a time on a real database (SQLite and PostgreSQL), under the playbook as it is now.

Each test drives whole cycles (advance, take due steps, dispatch) and looks at
what reached the transport, the way a marketer would judge it.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, update
from sqlmodel import col

from db.engine import session_scope
from db.models import Message, SequencePause
from nurture.playbook import Playbook, parse_playbook
from nurture.transports import InMemoryTransport
from tests.conftest import PLAYBOOK_PATH, T0, straight_welcome
from tests.db.world import World

ANN = "ann@northwind.example"
HOUR = timedelta(hours=1)


def playbook_with(*edits: tuple[str, str]) -> Playbook:
    """The shipped playbook with a straight welcome (branches and split tests: tests/db/test_reacting.py), edited."""
    text = straight_welcome(PLAYBOOK_PATH.read_text())
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    return parse_playbook(text)


# No quiet hours, cap or send window: these tests are about the walk; the contact policy has its own.
OPEN_POLICY = (
    """  # Nobody is emailed at night in their own time zone: due emails wait until morning.
  quiet_hours: {start: "21:00", end: "08:00"}
  # At most 3 emails per lead in any 7 days, across all sequences.
  frequency_cap: {max_messages: 3, per: 7d}
  # Sequences without their own send_window mail on working days only, in the lead's time zone.
  send_window: {days: [mon, tue, wed, thu, fri], between: ["08:00", "20:00"]}
""",
    "  {}\n",
)


@pytest.fixture
def open_playbook() -> Playbook:
    return playbook_with(OPEN_POLICY)


@pytest.fixture
def world(engine: Engine, open_playbook: Playbook) -> World:
    return World(engine, open_playbook)


def sent(world: World) -> list[str]:
    """Subjects of every email the transport accepted, in order."""
    assert isinstance(world.transport, InMemoryTransport)
    return [email.subject for email in world.transport.sent]


def sent_steps(world: World, email: str = ANN) -> list[str]:
    return [m.step_id for m in world.messages(email) if m.status == "sent"]


def warm_lead(world: World, at: datetime = T0) -> None:
    world.lead(ANN, at=at, first_name="Ann", job_title="Head of Data", company_size=200, country="US")
    world.events(ANN, ("form_submit", at), ("pricing_view", at + timedelta(minutes=5)))


def hourly(world: World, start: datetime, hours: int) -> None:
    for hour in range(hours):
        world.cycle(start + hour * HOUR)


def test_steps_are_decided_one_at_a_time_each_after_the_previous_was_sent(world: World) -> None:
    warm_lead(world)
    world.cycle(T0 + HOUR)
    [enrollment] = world.enrollments(ANN)
    assert sent_steps(world) == ["welcome"]
    # Nothing is queued ahead: the enrollment knows only where it is and when the next step is due.
    assert [m.step_id for m in world.messages(ANN)] == ["welcome"]
    assert enrollment.steps_done == ["welcome"]
    assert enrollment.next_due_at == T0 + HOUR + timedelta(days=3)
    message = world.messages(ANN)[0]
    assert message.playbook_version == world.playbook.version
    assert message.idempotency_key.endswith("/step:welcome")
    hourly(world, T0 + HOUR, 24 * 8)
    assert sent_steps(world) == ["welcome", "case_study", "webinar_invite"]
    sends = {m.step_id: m.sent_at for m in world.messages(ANN)}
    assert sends["case_study"] - sends["welcome"] == timedelta(days=3)
    assert sends["webinar_invite"] - sends["case_study"] == timedelta(days=4)
    [enrollment] = world.enrollments(ANN)
    assert (enrollment.state, enrollment.next_due_at) == ("completed", None)


def test_a_step_removed_mid_enrollment_is_never_sent(world: World) -> None:
    warm_lead(world)
    world.cycle(T0 + HOUR)
    # The marketer deletes case_study while Ann waits for it.
    world.playbook = playbook_with(
        OPEN_POLICY,
        (
            """      # `after` counts from when the previous step was sent.
      - after: 3d
        template: case_study
        subject: "How Northwind cut time-to-insight by 60%"
        preheader: "From a week of waiting per report to answers their product managers find themselves."
""",
            "",
        ),
    )
    hourly(world, T0 + HOUR, 24 * 8)
    assert sent_steps(world) == ["welcome", "webinar_invite"]
    assert not any("Northwind cut" in subject for subject in sent(world))
    sends = {m.step_id: m.sent_at for m in world.messages(ANN)}
    # The enrollment moved on to the next step that exists; its after counts from the last send.
    assert sends["webinar_invite"] - sends["welcome"] == timedelta(days=4)


def test_a_step_removed_after_it_was_queued_is_cancelled_not_sent(world: World, open_playbook: Playbook) -> None:
    warm_lead(world)
    world.cycle(T0 + HOUR)
    due = T0 + HOUR + timedelta(days=3)
    world.advance(due)  # case_study decided and queued, not yet dispatched
    assert [m.status for m in world.messages(ANN)] == ["sent", "queued"]
    world.playbook = playbook_with(
        OPEN_POLICY, ("        template: case_study\n", "        template: case_study\n        id: case_study_v2\n")
    )
    world.dispatch(due)
    queued = world.messages(ANN)[1]
    assert (queued.step_id, queued.status) == ("case_study", "cancelled")
    assert queued.last_error == "step removed from the playbook before it was sent"
    assert len(sent(world)) == 1
    # The walk goes on: the renamed step is a new step, decided after the cancelled one settled.
    hourly(world, due + HOUR, 24 * 8)
    assert sent_steps(world) == ["welcome", "case_study_v2", "webinar_invite"]


def test_an_edited_step_sends_its_new_subject(world: World) -> None:
    warm_lead(world)
    world.cycle(T0 + HOUR)
    world.playbook = playbook_with(
        OPEN_POLICY, ('"How Northwind cut time-to-insight by 60%"', '"{{ lead.first_name }}, the Northwind story"')
    )
    hourly(world, T0 + HOUR, 24 * 4)
    assert sent(world)[1] == "Ann, the Northwind story"
    message = world.messages(ANN)[1]
    assert message.subject_template == "{{ lead.first_name }}, the Northwind story"
    assert message.playbook_version == world.playbook.version


def test_an_edit_between_queueing_and_sending_sends_the_new_content(world: World) -> None:
    warm_lead(world)
    world.cycle(T0 + HOUR)
    due = T0 + HOUR + timedelta(days=3)
    world.advance(due)
    old_version = world.messages(ANN)[1].playbook_version
    world.playbook = playbook_with(
        OPEN_POLICY, ('"How Northwind cut time-to-insight by 60%"', '"Edited at the last minute"')
    )
    world.dispatch(due)
    assert sent(world)[1] == "Edited at the last minute"
    assert world.messages(ANN)[1].playbook_version == world.playbook.version != old_version


def test_after_twenty_days_of_downtime_one_cycle_sends_at_most_one_step_per_enrollment(world: World) -> None:
    for i in range(30):
        email = f"lead{i}@northwind.example"
        world.lead(email, at=T0, first_name="Ann", job_title="Head of Data", company_size=200, country="US")
        world.events(email, ("form_submit", T0), ("pricing_view", T0 + timedelta(minutes=5)))
    world.cycle(T0 + HOUR)
    assert len(sent(world)) == 30
    back = T0 + HOUR + timedelta(days=20)
    world.cycle(back)
    assert len(sent(world)) == 60  # one step each: case_study, not case_study and webinar_invite together
    per_lead = Counter(m.lead_id for m in world.all(Message) if m.sent_at == back)
    assert set(per_lead.values()) == {1}
    # The next cycles send nothing until the next step's after has passed again, counted from that send.
    hourly(world, back + HOUR, 24 * 4 - 1)
    assert len(sent(world)) == 60
    world.cycle(back + timedelta(days=4))
    assert len(sent(world)) == 90


def test_reentry_once_skips_a_lead_who_comes_back(engine: Engine) -> None:
    world = World(engine, playbook_with(OPEN_POLICY))
    _warm_cool_warm(world)
    welcome = [e for e in world.enrollments(ANN) if e.sequence == "welcome"]
    assert [e.state for e in welcome] == ["exited", "skipped"]
    assert (welcome[1].exit_reason or "").startswith("reentry: once (already enrolled")
    assert Counter(sent_steps(world))["welcome"] == 1


@pytest.mark.parametrize(("rule", "welcomes"), [("always", 2), ("{after: 30d}", 1), ("{after: 5d}", 2)])
def test_reentry_always_and_after(engine: Engine, rule: str, welcomes: int) -> None:
    world = World(
        engine,
        playbook_with(OPEN_POLICY, ("    reentry: once\n    # The welcome", f"    reentry: {rule}\n    # The welcome")),
    )
    _warm_cool_warm(world)
    assert Counter(sent_steps(world))["welcome"] == welcomes


def _warm_cool_warm(world: World) -> None:
    """Ann becomes warm, cools to cold by decay (about 24 days), and becomes warm again a day later."""
    world.lead(ANN, at=T0, first_name="Ann", job_title="Head of Data", company_size=200)  # fit 25
    world.events(ANN, ("form_submit", T0), ("pricing_view", T0))
    world.cycle(T0 + HOUR)
    at = T0 + HOUR
    while world.row(ANN).stage != "cold":
        review = world.row(ANN).next_review_at
        assert review is not None
        assert review < T0 + timedelta(days=60)
        at = review
        world.cycle(at)
    again = at + timedelta(days=1)
    world.events(ANN, ("form_submit", again), ("pricing_view", again))
    world.cycle(again + HOUR)
    assert world.transitions(ANN) == [("cold", "warm"), ("warm", "cold"), ("cold", "warm")]


def test_a_send_window_holds_a_due_step_until_it_opens_in_the_leads_zone(engine: Engine) -> None:
    window = playbook_with(
        OPEN_POLICY,
        (
            "contact_policy:\n  {}\n",
            'contact_policy:\n  send_window: {days: [mon, tue, wed, thu, fri], between: ["09:00", "17:00"]}\n',
        ),
    )
    world = World(engine, window)
    # Friday 2026-03-06 16:00 UTC is Saturday 01:00 in Tokyo: closed until Monday 09:00 there (Sunday 00:00 UTC).
    friday = datetime(2026, 3, 6, 16, 0, tzinfo=UTC)
    world.lead(ANN, at=friday, first_name="Ann", job_title="Head of Data", company_size=200, timezone="Asia/Tokyo")
    world.events(ANN, ("form_submit", friday), ("pricing_view", friday))
    world.cycle(friday)
    [message] = world.messages(ANN)
    assert message.status == "queued"
    assert message.due_at == datetime(2026, 3, 9, 0, 0, tzinfo=UTC)
    assert "send window" in (message.last_error or "")
    world.cycle(datetime(2026, 3, 8, 23, 59, tzinfo=UTC))
    assert sent(world) == []
    world.cycle(datetime(2026, 3, 9, 0, 0, tzinfo=UTC))
    assert len(sent(world)) == 1


def test_a_paused_sequence_decides_and_sends_nothing_until_resumed(world: World) -> None:
    warm_lead(world)
    with session_scope(world.engine) as session:
        session.add(SequencePause(sequence="welcome", paused_at=T0, reason="copy review"))
    hourly(world, T0 + HOUR, 24 * 10)
    assert sent(world) == []
    with session_scope(world.engine) as session:
        session.delete(session.get(SequencePause, "welcome"))
    resumed = T0 + timedelta(days=10, hours=1)
    world.cycle(resumed)
    # Resuming keeps the catch-up rule: one step, then the others spaced by their after.
    assert sent_steps(world) == ["welcome"]
    hourly(world, resumed + HOUR, 24 * 3)
    assert sent_steps(world) == ["welcome", "case_study"]


def test_a_retried_email_of_a_finished_sequence_is_cancelled_when_the_lead_leaves_its_stage(world: World) -> None:
    from db.messages import MessageSelection, retry_messages

    world.lead(ANN, at=T0, first_name="Ann", job_title="CTO", company_size=500)
    world.events(ANN, ("demo_request", T0), ("webinar_attended", T0), ("pricing_view", T0))
    hourly(world, T0 + HOUR, 24 * 3)
    assert sent_steps(world) == ["demo_offer", "sales_handoff"]
    [demo_offer] = world.enrollments(ANN)
    assert demo_offer.state == "completed"
    first = world.messages(ANN)[0].id
    with session_scope(world.engine) as session:
        session.execute(update(Message).where(col(Message.id) == first).values(status="failed"))
        assert retry_messages(session=session, selection=MessageSelection(ids=(first,)), now=T0) == 1
    # Before it goes out, Ann buys: the demo offer is no longer the right email.
    world.events(ANN, ("purchase", T0 + timedelta(days=3, hours=1)))
    world.advance(T0 + timedelta(days=3, hours=2))
    retried = world.messages(ANN)[0]
    assert (retried.status, retried.last_error) == ("cancelled", "enrollment exited: lead changed stage")
    world.dispatch(T0 + timedelta(days=3, hours=2))
    assert "See Acme Analytics on your own data" not in sent(world)[1:]


def test_a_goal_event_converts_the_enrollment_and_cancels_the_rest(world: World) -> None:
    warm_lead(world)
    world.cycle(T0 + HOUR)
    due = T0 + HOUR + timedelta(days=3)
    world.advance(due)  # case_study decided and queued
    # Ann asks for a demo before it goes out: the welcome has done its job.
    world.events(ANN, ("demo_request", due + timedelta(minutes=5)))
    result = world.advance(due + timedelta(minutes=10))
    assert result.conversions == 1
    welcome = next(e for e in world.enrollments(ANN) if e.sequence == "welcome")
    assert (welcome.state, welcome.converted_after_step, welcome.next_due_at) == ("converted", "welcome", None)
    assert welcome.converted_at == due + timedelta(minutes=5)
    assert welcome.exit_reason == f"goal reached: demo_request on {due + timedelta(minutes=5):%Y-%m-%d %H:%M} UTC"
    case_study = next(m for m in world.messages(ANN) if m.step_id == "case_study")
    assert (case_study.status, case_study.last_error) == ("cancelled", "enrollment converted: goal reached")
    hourly(world, due + timedelta(minutes=15), 24 * 8)
    assert "case_study" not in sent_steps(world)
    assert "webinar_invite" not in sent_steps(world)


def test_unless_clicked_skips_a_step_for_a_lead_who_clicked_and_sends_it_to_one_who_did_not(engine: Engine) -> None:
    from db.inbound import ingest_provider_events
    from nurture.inbound import parse_sendgrid_batch

    world = World(
        engine,
        playbook_with(
            OPEN_POLICY,
            ("        template: case_study\n", "        template: case_study\n        unless: {clicked: welcome}\n"),
        ),
    )
    bob = "bob@northwind.example"
    for email in (ANN, bob):
        world.lead(email, at=T0, first_name="Ann", job_title="Head of Data", company_size=200, country="US")
        world.events(email, ("form_submit", T0), ("pricing_view", T0 + timedelta(minutes=5)))
    world.cycle(T0 + HOUR)
    welcome = next(m for m in world.messages(ANN) if m.step_id == "welcome")
    # Ann clicks her welcome email (through SendGrid's webhook, as in production); Bob does not.
    click = {
        "email": ANN,
        "event": "click",
        "timestamp": int((T0 + 2 * HOUR).timestamp()),
        "sg_event_id": "click-1",
        "url": "https://acme-analytics.example/docs",
        "nurture_message_id": str(welcome.id),
    }
    with session_scope(engine) as session:
        ingest_provider_events(session=session, events=parse_sendgrid_batch([click]).events, now=T0 + 2 * HOUR)
    hourly(world, T0 + 2 * HOUR, 24 * 8)
    assert sent_steps(world, ANN) == ["welcome", "webinar_invite"]
    skipped = next(m for m in world.messages(ANN) if m.step_id == "case_study")
    assert (skipped.status, skipped.last_error) == ("skipped", "skipped: unless clicked welcome, and the lead did")
    assert skipped.sent_at is None
    assert sent_steps(world, bob) == ["welcome", "case_study", "webinar_invite"]
    # The walk went on from the skip: webinar_invite 4 days after it, not 7 after welcome.
    webinar = next(m for m in world.messages(ANN) if m.step_id == "webinar_invite")
    assert webinar.sent_at is not None
    assert webinar.sent_at - skipped.created_at == timedelta(days=4)
