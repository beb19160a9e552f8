"""Replaying hand-built leads under two playbooks: what a change does to stages, enrollments and emails."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from nurture.history import LeadHistory, LeadRun, LiveEnrollment, Outcome, PastEvent
from nurture.impact import Impact, inflight_changes
from nurture.playbook import Playbook, Stage, parse_playbook
from nurture.population import generate_population
from nurture.scoring import LeadScoreState
from nurture.sequences import EnrollmentState
from nurture.simulation import replay_both, replay_lead
from tests.conftest import PLAYBOOK_PATH, T0

SHIPPED = PLAYBOOK_PATH.read_text()
HANDOFF = """      - after: 2d
        template: sales_handoff
        subject: "Your {{ brand.name }} contact{% if lead.company %} for {{ lead.company }}{% endif %}"
        preheader: "Pricing, security or a trial on your own data: one person to ask from now on."
"""
WARM = "warm: {enter_at: 40, leave_below: 30}"


def edited(old: str, new: str) -> Playbook:
    assert old in SHIPPED
    return parse_playbook(SHIPPED.replace(old, new))


def lead(events: list[tuple[str, datetime]], *, lead_id: int = 1, **profile: object) -> LeadHistory:
    return LeadHistory(
        id=lead_id,
        email=f"lead{lead_id}@northwind.example",
        profile={"email": f"lead{lead_id}@northwind.example", "timezone": "UTC", **profile},
        timezone="UTC",
        created_at=T0,
        events=tuple(PastEvent(kind, at) for kind, at in sorted(events, key=lambda e: e[1])),
        live_stage=Stage.cold,
        live_score=LeadScoreState(),
    )


def sent(run: LeadRun) -> list[tuple[str, str]]:
    return [(e.sequence, e.step_id) for e in run.emails if e.outcome == Outcome.sent]


def test_a_lead_crossing_a_lowered_warm_threshold_is_welcomed() -> None:
    # Fit 30 (decision maker, mid-market, target market) and two page views: 32, below 40 but above 25.
    someone = lead(
        [("page_view", T0 + timedelta(hours=1)), ("page_view", T0 + timedelta(hours=2))],
        job_title="VP Product",
        company_size=200,
        country="US",
    )
    now = T0 + timedelta(days=1)
    current = replay_lead(someone, parse_playbook(SHIPPED), now=now)
    lowered = replay_lead(someone, edited(WARM, "warm: {enter_at: 25, leave_below: 20}"), now=now)

    assert current.stage == Stage.cold
    assert current.emails == ()
    assert current.transitions == ()
    assert lowered.stage == Stage.warm
    assert [(t.from_stage, t.to_stage, t.at) for t in lowered.transitions] == [(Stage.cold, Stage.warm, T0)]
    assert [(e.sequence, e.state) for e in lowered.enrollments] == [("welcome", EnrollmentState.active)]
    # Monday 09:00 UTC: inside the send window, outside quiet hours, so the welcome goes at once.
    assert [(e.sequence, e.step_id, e.outcome, e.at) for e in lowered.emails] == [
        ("welcome", "welcome", Outcome.sent, T0)
    ]

    impact = Impact(since=T0, now=now, current_version="a", new_version="b")
    impact.add(someone, current, lowered)
    assert impact.matrix == {(Stage.cold, Stage.warm): 1}
    [row] = impact.email_rows()
    assert (row["sequence"], row["step"], row["sent"]) == (
        "welcome",
        "welcome",
        {"current": 0, "new": 1, "difference": 1},
    )
    [most] = impact.most_affected
    assert most.email == "lead1@northwind.example"
    assert most.sent == (0, 1)


def hot_lead() -> LeadHistory:
    return lead(
        [("demo_request", T0), ("webinar_attended", T0), ("pricing_view", T0)],
        job_title="CTO",
        company_size=500,
    )


def test_a_removed_step_is_counted_as_no_longer_sent() -> None:
    without = edited(HANDOFF, "")
    now = T0 + timedelta(days=5)
    current = replay_lead(hot_lead(), parse_playbook(SHIPPED), now=now)
    new = replay_lead(hot_lead(), without, now=now)

    assert sent(current) == [("demo_offer", "demo_offer"), ("demo_offer", "sales_handoff")]
    assert sent(new) == [("demo_offer", "demo_offer")]
    impact = Impact(since=T0, now=now, current_version="a", new_version="b")
    impact.add(hot_lead(), current, new)
    rows = {(r["sequence"], r["step"]): r for r in impact.email_rows()}
    assert rows[("demo_offer", "sales_handoff")]["sent"] == {"current": 1, "new": 0, "difference": -1}
    assert rows[("demo_offer", "demo_offer")]["sent"]["difference"] == 0
    assert impact.matrix == {}
    assert impact.emails_differ == 1


def test_a_goal_stops_the_sequence() -> None:
    # Warm (43) from a form, a webinar and pricing views, with no fit points to take it hot later;
    # two days into the welcome, the lead asks for a demo: about 69, still warm, and the welcome's goal.
    events = [
        ("form_submit", T0 + timedelta(hours=1)),
        ("webinar_attended", T0 + timedelta(hours=1)),
        *(("pricing_view", T0 + timedelta(hours=1)) for _ in range(3)),
        ("demo_request", T0 + timedelta(days=2)),
    ]
    someone = lead(events)
    now = T0 + timedelta(days=12)
    with_goal = replay_lead(someone, parse_playbook(SHIPPED), now=now)
    without_goal = replay_lead(someone, edited("    goal: {events: [demo_request]}\n", ""), now=now)

    assert with_goal.stage == without_goal.stage == Stage.warm
    [welcome] = with_goal.enrollments
    assert welcome.state == EnrollmentState.converted
    assert welcome.reason is not None
    assert welcome.reason.startswith("goal reached: demo_request")
    assert sent(with_goal) == [("welcome", "welcome")]
    # Without the goal the walk goes on: no click on the welcome, so the nudge, then the case study
    # (webinar_invite is skipped: the lead attended a webinar).
    assert sent(without_goal) == [("welcome", "welcome"), ("welcome", "welcome_nudge"), ("welcome", "case_study")]
    assert [(e.step_id, e.outcome) for e in without_goal.emails if e.outcome != Outcome.sent] == [
        ("webinar_invite", Outcome.skipped)
    ]


def test_the_contact_policy_holds_an_email_until_the_send_window_opens() -> None:
    saturday = T0 + timedelta(days=5)  # 2026-03-07 09:00 UTC
    someone = lead(
        [("demo_request", saturday), ("webinar_attended", saturday), ("pricing_view", saturday)],
        job_title="CTO",
        company_size=500,
    )
    run = replay_lead(someone, parse_playbook(SHIPPED), now=saturday + timedelta(days=3))
    first = run.emails[0]
    assert (first.step_id, first.outcome) == ("demo_offer", Outcome.sent)
    assert first.at == T0 + timedelta(days=7, hours=-1)  # Monday 08:00, when the window opens


def test_the_same_playbook_makes_no_difference() -> None:
    playbook = parse_playbook(SHIPPED)
    impact = Impact(since=T0, now=T0 + timedelta(days=5), current_version="a", new_version="a")
    someone = hot_lead()
    impact.add(someone, replay_lead(someone, playbook, now=impact.now), replay_lead(someone, playbook, now=impact.now))
    assert not impact.changed
    assert impact.most_affected == []


def test_inflight_enrollments_whose_next_step_or_sequence_goes_away() -> None:
    current = parse_playbook(SHIPPED)
    new = edited("  win_back:\n", "  win_back_renamed:\n")
    enrollment = LiveEnrollment(1, 7, "lead7@northwind.example", "demo_offer", Stage.hot, ("demo_offer",), (), T0)
    gone = LiveEnrollment(2, 8, "lead8@northwind.example", "win_back", Stage.cold, (), (), T0)
    stages = {7: (Stage.hot, Stage.hot), 8: (Stage.cold, Stage.cold)}
    [change] = inflight_changes([enrollment, gone], current=current, new=new, stage_now=stages)
    assert (change.enrollment_id, change.change) == (2, "sequence removed")

    assert inflight_changes([enrollment], current=current, new=current, stage_now=stages) == []
    [removed] = inflight_changes([enrollment], current=current, new=edited(HANDOFF, ""), stage_now=stages)
    assert (removed.change, removed.detail) == (
        "next step removed",
        "step sales_handoff is not sent: the enrollment completes",
    )
    cooler = {7: (Stage.hot, Stage.warm)}
    [ends] = inflight_changes([enrollment], current=current, new=current, stage_now=cooler)
    assert ends.change == "stage change ends it"


def test_a_stored_click_on_the_welcome_takes_the_branch_to_the_case_study() -> None:
    warm = [("form_submit", T0), ("webinar_attended", T0), *(("pricing_view", T0) for _ in range(3))]
    click = PastEvent("email_click", T0 + timedelta(days=1), ("welcome", "welcome"))
    clicked = replace(lead(warm), events=(*lead(warm).events, click))
    now = T0 + timedelta(days=5)
    playbook = parse_playbook(SHIPPED)
    assert sent(replay_lead(lead(warm), playbook, now=now))[:2] == [
        ("welcome", "welcome"),
        ("welcome", "welcome_nudge"),
    ]
    run = replay_lead(clicked, playbook, now=now)
    assert [(e.step_id, e.at) for e in run.emails] == [("welcome", T0), ("case_study", T0 + timedelta(days=4))]


def test_the_new_playbook_goes_live_at_the_window_start_from_the_state_the_current_one_left() -> None:
    someone = lead(
        [("page_view", T0 + timedelta(hours=1)), ("page_view", T0 + timedelta(hours=2))],
        job_title="VP Product",
        company_size=200,
        country="US",
    )
    since, now = T0 + timedelta(days=1), T0 + timedelta(days=2)
    lowered = edited(WARM, "warm: {enter_at: 25, leave_below: 20}")
    run = replay_lead(someone, parse_playbook(SHIPPED), now=now, switch_to=lowered, switch_at=since)
    # Cold under the current playbook until the change goes live; then scored again under the new one: warm.
    assert [(t.from_stage, t.to_stage, t.at) for t in run.transitions] == [(Stage.cold, Stage.warm, since)]
    assert sent(run) == [("welcome", "welcome")]
    whole = replay_lead(someone, parse_playbook(SHIPPED), now=now, switch_to=lowered, switch_at=None)
    assert [t.at for t in whole.transitions] == [T0]


def test_a_step_removed_while_its_email_is_held_is_cancelled_when_the_change_goes_live() -> None:
    # Hot on a Saturday: the demo offer waits for Monday's send window; the change removing it goes live on Sunday.
    saturday = T0 + timedelta(days=5)
    someone = lead(
        [("demo_request", saturday), ("webinar_attended", saturday), ("pricing_view", saturday)],
        job_title="CTO",
        company_size=500,
    )
    offer = """      - after: 0h
        template: demo_offer
        subject: "See {{ brand.name }} on your own data"
        preheader: "A 30-minute demo{% if lead.company %} for {{ lead.company }}{% endif %} with a product specialist."
"""
    sunday = saturday + timedelta(days=1)
    run = replay_lead(
        someone,
        parse_playbook(SHIPPED),
        now=saturday + timedelta(days=4),
        switch_to=edited(offer, ""),
        switch_at=sunday,
    )
    first = run.emails[0]
    assert (first.step_id, first.outcome, first.at) == (
        "demo_offer",
        Outcome.cancelled,
        T0 + timedelta(days=7, hours=-1),
    )
    assert first.reason == "step removed from the playbook before it was sent"
    # The walk goes on with the step that is left, its `after` counted from then.
    assert sent(run) == [("demo_offer", "sales_handoff")]


def test_replaying_both_at_once_is_the_same_as_replaying_each() -> None:
    population = generate_population(leads=120, start=T0, end=T0 + timedelta(weeks=5), seed=4)
    events: dict[str, list[PastEvent]] = {}
    for record in sorted(population.events, key=lambda e: e.occurred_at):
        events.setdefault(record.email, []).append(PastEvent(record.kind, record.occurred_at))
    current, lowered = parse_playbook(SHIPPED), edited(WARM, "warm: {enter_at: 25, leave_below: 20}")
    now = T0 + timedelta(weeks=5)
    since = now - timedelta(days=14)
    differ = 0
    for number, record in enumerate(population.leads, 1):
        profile = {"email": record.email, **record.profile, "attributes": record.attributes}
        history = replace(
            lead([], lead_id=number),
            email=record.email,
            profile=profile,
            timezone=str(record.profile.get("timezone") or "UTC"),
            events=tuple(events.get(record.email, ())),
        )
        both = replay_both(history, current, lowered, now=now, switch_at=since)
        assert both == (
            replay_lead(history, current, now=now),
            replay_lead(history, current, now=now, switch_to=lowered, switch_at=since),
        )
        differ += both[0] != both[1]
    assert differ > 0
