"""Sequences that react to the lead on a real database (SQLite and PostgreSQL): wait_for branches
driven by SendGrid events through the webhook's path, machine opens, and split-test variants.

Each test drives real cycles (advance, walk, dispatch) and reads what reached the transport.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from db.engine import session_scope
from db.enrollments import EnrollmentSelection, list_enrollments
from db.models import Enrollment
from db.reports import explain_lead
from nurture.playbook import Playbook, parse_playbook
from nurture.sequences import assign_variant
from nurture.timeline import render
from nurture.transports import InMemoryTransport
from tests.conftest import PLAYBOOK_PATH, T0
from tests.db.test_walking import OPEN_POLICY
from tests.db.world import World

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
ANN, BOB, CAT = "ann@northwind.example", "bob@northwind.example", "cat@northwind.example"


def shipped_with(*edits: tuple[str, str]) -> Playbook:
    """The shipped playbook (its welcome: a split test that waits 3d for a click), without the
    contact policy's windows (these tests are about the walk), edited."""
    text = PLAYBOOK_PATH.read_text()
    for old, new in (OPEN_POLICY, *edits):
        assert old in text, old
        text = text.replace(old, new, 1)
    return parse_playbook(text)


def warm(world: World, *emails: str, at: datetime = T0) -> None:
    for email in emails:
        world.lead(email, at=at, first_name="Ann", job_title="Head of Data", company_size=200, country="US")
        world.events(email, ("form_submit", at), ("pricing_view", at + timedelta(minutes=5)))


def sent_steps(world: World, email: str) -> list[str]:
    return [m.step_id for m in world.messages(email) if m.status == "sent"]


def welcome(world: World, email: str) -> Enrollment:
    return next(e for e in world.enrollments(email) if e.sequence == "welcome")


def explained(world: World, email: str) -> dict[str, Any]:
    with session_scope(world.engine) as session:
        report = explain_lead(session=session, email=email, playbook=world.playbook, now=T0 + 30 * DAY)
    assert report is not None
    return report


def test_wait_for_a_click_takes_then_for_a_click_in_time_and_else_otherwise(engine: Engine) -> None:
    world = World(engine, shipped_with())
    warm(world, ANN, BOB, CAT)
    world.cycle(T0 + HOUR)
    assert [sent_steps(world, e) for e in (ANN, BOB, CAT)] == [["welcome"]] * 3
    world.cycle(T0 + 2 * HOUR)  # the walk looks once: nobody clicked yet, so each waits until its deadline
    deadline = T0 + HOUR + 3 * DAY
    assert {(e.next_due_at, e.waiting_until) for e in (welcome(world, m) for m in (ANN, BOB, CAT))} == {
        (deadline, deadline)
    }

    bob_waits = explained(world, BOB)["enrollments"][0]
    assert (bob_waits["waiting_for"], bob_waits["waiting_until"]) == (
        "clicked welcome: then case_study, else welcome_nudge",
        deadline.isoformat(),
    )
    assert bob_waits["next_step"] is None  # the wait decides it
    with session_scope(world.engine) as session:
        [listed] = list_enrollments(session=session, selection=EnrollmentSelection(email=BOB))
    assert (listed.waiting_until, listed.next_due_at) == (deadline, deadline)

    # Ann clicks a day later: the next cycle wakes her enrollment and takes `then`, not at the deadline.
    world.engage(ANN, "welcome", "click", T0 + DAY)
    world.cycle(T0 + DAY + HOUR)
    assert world.walked.branches == {"then": 1}
    ann = welcome(world, ANN)
    assert ann.branches == [
        {"step": "welcome", "took": "then", "to": "case_study", "at": (T0 + DAY + HOUR).isoformat()}
    ]
    assert (ann.waiting_until, ann.next_due_at) == (None, T0 + DAY + HOUR + 3 * DAY)
    story = explained(world, ANN)
    assert story["enrollments"][0]["branches"] == ann.branches
    assert (story["enrollments"][0]["waiting_for"], story["enrollments"][0]["next_step"]) == (None, "case_study")
    [first_email] = story["messages"]
    assert (first_email["clicked_at"], first_email["opened_at"]) == ((T0 + DAY).isoformat(), None)
    assert first_email["variant"] in {"a", "b"}

    # Cat clicks half an hour after her 3 days ran out: too late, like Bob who never clicks.
    world.engage(CAT, "welcome", "click", deadline + timedelta(minutes=30))
    world.cycle(deadline + HOUR)
    assert world.walked.branches == {"else": 2}
    for email in (BOB, CAT):
        assert sent_steps(world, email) == ["welcome", "welcome_nudge"]
        assert welcome(world, email).branches[0]["took"] == "else"

    for day in range(1, 8):
        world.cycle(deadline + HOUR + day * DAY)
    assert sent_steps(world, ANN) == ["welcome", "case_study", "webinar_invite"]
    ann_case_study = next(m for m in world.messages(ANN) if m.step_id == "case_study")
    assert ann_case_study.sent_at == T0 + DAY + HOUR + 3 * DAY + HOUR  # the first cycle on or after it was due
    for email in (BOB, CAT):
        assert sent_steps(world, email) == ["welcome", "welcome_nudge", "case_study", "webinar_invite"]


def test_a_machine_open_does_not_satisfy_a_wait_for_an_open(engine: Engine) -> None:
    world = World(engine, shipped_with(("{clicked: welcome, within: 3d}", "{opened: welcome, within: 3d}")))
    warm(world, ANN, BOB)
    world.cycle(T0 + HOUR)
    # Apple Mail Privacy Protection opens Ann's email; Bob opens his.
    world.engage(ANN, "welcome", "open", T0 + 2 * HOUR, machine=True)
    world.engage(BOB, "welcome", "open", T0 + 2 * HOUR)
    world.cycle(T0 + 3 * HOUR)
    assert world.walked.branches == {"then": 1}
    assert welcome(world, BOB).branches[0]["took"] == "then"
    assert welcome(world, ANN).branches == []
    world.cycle(T0 + HOUR + 3 * DAY)
    assert welcome(world, ANN).branches[0]["took"] == "else"
    assert sent_steps(world, ANN) == ["welcome", "welcome_nudge"]
    assert "welcome_nudge" not in sent_steps(world, BOB)


def test_each_lead_gets_its_variant_recorded_on_the_message_and_sent(engine: Engine) -> None:
    playbook = shipped_with()
    world = World(engine, playbook)
    leads = [f"lead{i}@northwind.example" for i in range(24)]
    warm(world, *leads)
    world.cycle(T0 + HOUR)
    step = playbook.sequences["welcome"].steps[0]
    assert isinstance(world.transport, InMemoryTransport)
    subjects = {email.to_email: email.subject for email in world.transport.sent}
    variants: list[str | None] = []
    for email in leads:
        [message] = world.messages(email)
        expected = assign_variant(step, lead_id=world.row(email).id or 0, sequence="welcome")
        assert expected is not None
        assert (message.status, message.variant) == ("sent", expected.id)
        assert subjects[email].endswith(("get started with Acme Analytics", "dashboard takes an afternoon"))
        assert ("afternoon" in subjects[email]) == (expected.id == "b")
        variants.append(message.variant)
    assert set(variants) == {"a", "b"}  # 24 leads: both arms (checked for these ids, the hash is fixed)
    assert world.walked.variants == {f"welcome/welcome/{v}": variants.count(v) for v in ("a", "b")}


def test_explain_reads_as_a_timeline_at_80_columns_and_says_what_happens_next(engine: Engine) -> None:
    world = World(engine, shipped_with())
    warm(world, ANN, BOB)
    world.cycle(T0 + HOUR)
    world.cycle(T0 + 2 * HOUR)
    world.engage(ANN, "welcome", "click", T0 + DAY)
    world.cycle(T0 + DAY + HOUR)
    now = T0 + DAY + 2 * HOUR

    def story(email: str) -> list[str]:
        with session_scope(world.engine) as session:
            report = explain_lead(session=session, email=email, playbook=world.playbook, now=now)
        assert report is not None
        return render(report, world.playbook, now)

    ann = story(ANN)
    assert max(len(line) for line in ann) <= 80, "\n".join(ann)
    text = "\n".join(ann)
    # Oldest first: the activity, the stage change it caused, the enrollment, the email, the branch its click took.
    order = [
        "· form_submit, pricing_view",
        "▶ cold → warm: score",
        "→ enrolled in welcome",
        "✉ sent: welcome/welcome (variant",
        "why: welcome, step 1, started by cold → warm",
        "clicked ",
        "welcome: after welcome, condition met? yes → case_study",
        "What happens next",
        f"welcome: next step case_study, due {(T0 + DAY + HOUR + 3 * DAY):%Y-%m-%d %H:%M}",
    ]
    positions = [text.find(part) for part in order]
    assert -1 not in positions, (positions, text)
    assert positions == sorted(positions), (positions, text)
    assert "fit: decision maker +15.0" in text
    # The score changes, rule by rule, on the day they happened.
    assert any(line.startswith(f"{T0 + HOUR:%Y-%m-%d %H:%M}  score 0 → ") for line in ann), text

    bob = "\n".join(story(BOB))
    assert "welcome: waiting until" in bob
    assert "for clicked welcome: then case_study" in bob
    # Fit 30 holds warm (leave_below 30) however far the engagement decays.
    assert "the score settles towards its fit, 30, and the stage\n    stays warm." in bob
