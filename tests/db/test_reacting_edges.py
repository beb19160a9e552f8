"""Waits and split tests at their edges, on a real database (SQLite and PostgreSQL): overlapping cycles,
an upgrade in the middle of a sequence, exits while waiting, arms removed or turned off, an ended test,
pauses over a deadline, clocks ahead of ours."""

from __future__ import annotations

import io
import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import Engine

import nurture.cli as cli
from db.cycle import due_enrollments, lead_activity, save_enrollment_changes
from db.engine import session_scope
from db.enrollments import pause_sequence, resume_sequence
from db.inbound import unsubscribe_lead
from db.reports import explain_lead, reacting_lead
from nurture.playbook import Playbook, parse_playbook
from nurture.sequences import decide_due_steps
from tests.conftest import PLAYBOOK_PATH, T0
from tests.db.test_reacting import ANN, BOB, CAT, DAY, HOUR, shipped_with, warm, welcome
from tests.db.test_walking import OPEN_POLICY
from tests.db.world import World


def playbook_before_waits() -> Playbook:
    """The shipped playbook before the welcome reacted: no split test, no wait and no nudge; case_study
    3 days after the welcome. What an installation ran before upgrading to waits."""
    text = PLAYBOOK_PATH.read_text().replace(*OPEN_POLICY)
    start = text.index("      - id: welcome\n")
    end = text.index("      # `after` counts from when the previous step was sent")
    old_welcome = (
        "      - after: 0h\n"
        "        template: welcome\n"
        "        subject: \"{{ lead.first_name or 'Hi' }}, here is how teams get started with {{ brand.name }}\"\n"
    )
    nudge = (
        "      - after: 0h\n        template: welcome_nudge\n"
        '        subject: "In case it got buried: getting started with {{ brand.name }}"\n'
        '        preheader: "Ten minutes and one data source are enough to see whether it fits."\n'
    )
    return parse_playbook(text[:start] + old_welcome + text[end:].replace(nudge, "", 1))


def printed_explanation(report: dict[str, Any], playbook: Playbook, now: datetime) -> str:
    out = io.StringIO()
    saved = cli.console
    cli.console = Console(file=out, width=200)
    try:
        cli._print_explanation(report, playbook, now)
    finally:
        cli.console = saved
    return out.getvalue()


def test_a_click_seen_by_an_overlapping_cycle_still_wakes_the_wait(engine: Engine) -> None:
    """Cycle A's walk holds an enrollment whose wait is due for its first look while cycle B scores the
    lead's click: B's wake-up waits for A's commit and applies after it (on PostgreSQL an UPDATE whose WHERE
    no longer matches the committed row would skip it), so the click is seen by the next cycle, not 3 days
    later at the deadline."""
    if engine.dialect.name != "postgresql":
        pytest.skip(
            "PostgreSQL only: on SQLite a walk and an advance cannot overlap (writers queue on BEGIN IMMEDIATE)"
        )
    world = World(engine, shipped_with())
    warm(world, ANN)
    world.cycle(T0 + HOUR)  # welcome sent and settled: its wait is due for a first look
    now = T0 + 2 * HOUR
    with session_scope(engine) as walk:  # cycle A's walk, in flight
        [snapshot] = due_enrollments(session=walk, now=now, limit=10)
        activity = lead_activity(session=walk, enrollment_ids=[snapshot.id], now=now)
        # Meanwhile Ann clicks; the webhook stores it, and cycle B advances her (B's walk skips the locked row).
        world.engage(ANN, "welcome", "click", now - timedelta(minutes=30))
        cycle_b = threading.Thread(target=world.advance, args=(now,))
        cycle_b.start()
        cycle_b.join(2)  # B waits for A's row lock: it applies after A commits
        changes = decide_due_steps([snapshot], playbook=world.playbook, now=now, activity=activity)
        save_enrollment_changes(session=walk, changes=changes, now=now)
    cycle_b.join(30)
    world.cycle(now + HOUR)  # the next cycle: the click should have woken the wait
    branches = welcome(world, ANN).branches
    assert [b["took"] for b in branches] == ["then"], welcome(world, ANN)


def test_after_the_upgrade_a_lead_past_the_welcome_is_woken_by_its_click(engine: Engine) -> None:
    """A lead mailed the welcome before the upgrade waits on the shipped welcome's wait_for with no
    ``waiting_until`` written yet: its click on day 1 still wakes it (case_study on day 4, not day 6)."""
    world = World(engine, playbook_before_waits())
    warm(world, ANN)
    world.cycle(T0 + HOUR)
    world.cycle(T0 + 2 * HOUR)
    assert welcome(world, ANN).steps_done == ["welcome"]
    world.playbook = shipped_with()  # the upgrade
    world.engage(ANN, "welcome", "click", T0 + DAY)
    world.cycle(T0 + DAY + HOUR)
    assert welcome(world, ANN).branches, "the click did not wake the enrollment (waiting_until is NULL)"


def test_after_the_upgrade_explain_does_not_say_the_waiting_welcome_ends(engine: Engine) -> None:
    """Same upgrade: `nurture explain` says what the welcome waits for, counted from when its step
    settled, not that it ends."""
    world = World(engine, playbook_before_waits())
    warm(world, ANN)
    world.cycle(T0 + HOUR)
    world.cycle(T0 + 2 * HOUR)
    world.playbook = shipped_with()
    with session_scope(engine) as session:
        report = explain_lead(session=session, email=ANN, playbook=world.playbook, now=T0 + 3 * HOUR)
    assert report is not None
    [enrollment] = report["enrollments"]
    assert enrollment["state"] == "active"
    assert enrollment["waiting_for"] is not None or enrollment["next_step"] is not None, enrollment
    printed = printed_explanation(report, world.playbook, T0 + 3 * HOUR)
    assert "welcome: no step left" not in printed
    assert "welcome: waiting until " in printed


def test_an_unsubscribe_while_waiting_clears_the_wait_deadline(engine: Engine) -> None:
    """An unsubscribe ends a waiting enrollment and clears its deadline, as leaving the stage and
    converting do."""
    world = World(engine, shipped_with())
    warm(world, ANN)
    world.cycle(T0 + HOUR)
    world.cycle(T0 + 2 * HOUR)
    assert welcome(world, ANN).waiting_until is not None
    lead_id = world.row(ANN).id
    assert lead_id is not None
    with session_scope(engine) as session:
        unsubscribe_lead(session=session, lead_id=lead_id, now=T0 + 3 * HOUR)
    enrollment = welcome(world, ANN)
    assert enrollment.state == "exited"
    assert enrollment.waiting_until is None


def test_a_variant_turned_off_with_weight_0_is_not_sent_to_messages_already_queued(engine: Engine) -> None:
    """`weight: 0` turns a variant off for messages already queued too (held by the contact policy):
    they are sent the variant the test gives the lead now."""
    world = World(engine, shipped_with())
    leads = [f"lead{i}@northwind.example" for i in range(8)]
    warm(world, *leads)
    world.advance(T0 + HOUR)  # decided and queued, not sent yet
    on_b = [email for email in leads if world.messages(email)[0].variant == "b"]
    assert on_b
    b_weight = 'dashboard takes an afternoon"\n            weight: 50'
    world.playbook = shipped_with((b_weight, b_weight.replace("weight: 50", "weight: 0")))
    world.dispatch(T0 + HOUR)
    assert [(world.messages(e)[0].status, world.messages(e)[0].variant) for e in on_b] == [("sent", "a")] * len(on_b)


SPLIT = """        variants:
          - id: a
            template: welcome
            subject: "{{ lead.first_name or 'Hi' }}, here is how teams get started with {{ brand.name }}"
            weight: 50
          - id: b
            template: welcome
            subject: "{{ lead.first_name or 'Hi' }}, your first {{ brand.name }} dashboard takes an afternoon"
            weight: 50
        # A subject line is judged on opens (by people: Apple Mail's machine opens never count).
        judged_on: opened
"""


def test_a_queued_message_whose_arm_was_removed_records_the_arm_it_was_sent(engine: Engine) -> None:
    world = World(engine, shipped_with())
    warm(world, ANN, BOB, CAT)
    world.advance(T0 + HOUR)  # decided and queued, not sent
    assert {world.messages(e)[0].variant for e in (ANN, BOB, CAT)} <= {"a", "b"}
    world.playbook = shipped_with(("- id: a", "- id: c"))  # arm a is gone
    world.dispatch(T0 + HOUR)
    for email in (ANN, BOB, CAT):
        [message] = world.messages(email)
        assert message.status == "sent"
        assert message.variant in {"b", "c"}
        assert ("afternoon" in (message.subject or "")) == (message.variant == "b")


def test_a_queued_message_of_an_ended_split_test_records_no_variant(engine: Engine) -> None:
    world = World(engine, shipped_with())
    warm(world, ANN)
    world.advance(T0 + HOUR)
    assert world.messages(ANN)[0].variant in {"a", "b"}
    world.playbook = shipped_with((SPLIT, '        template: welcome\n        subject: "Plain welcome"\n'))
    world.dispatch(T0 + HOUR)
    [message] = world.messages(ANN)
    assert (message.status, message.variant, message.subject) == ("sent", None, "Plain welcome")


def test_goal_or_leaving_the_stage_while_waiting_clears_the_wait(engine: Engine) -> None:
    world = World(engine, shipped_with())
    warm(world, ANN, BOB)
    world.cycle(T0 + HOUR)
    world.cycle(T0 + 2 * HOUR)
    world.events(ANN, ("demo_request", T0 + 3 * HOUR))
    world.events(BOB, ("purchase", T0 + 3 * HOUR))
    world.cycle(T0 + 4 * HOUR)
    assert (welcome(world, ANN).state, welcome(world, ANN).waiting_until) == ("converted", None)
    assert welcome(world, BOB).state != "active"
    assert welcome(world, BOB).waiting_until is None


def test_a_pause_over_the_deadline_decides_by_when_the_lead_clicked(engine: Engine) -> None:
    world = World(engine, shipped_with())
    warm(world, ANN, BOB)
    world.cycle(T0 + HOUR)
    world.cycle(T0 + 2 * HOUR)
    with session_scope(engine) as session:
        pause_sequence(session=session, name="welcome", reason="review", now=T0 + 2 * HOUR)
    world.engage(ANN, "welcome", "click", T0 + DAY)
    world.engage(BOB, "welcome", "click", T0 + 5 * DAY)
    world.cycle(T0 + DAY + HOUR)
    assert welcome(world, ANN).branches == []
    with session_scope(engine) as session:
        resume_sequence(session=session, name="welcome")
    world.cycle(T0 + 7 * DAY)
    assert welcome(world, ANN).branches[0]["took"] == "then"
    assert welcome(world, BOB).branches[0]["took"] == "else"


def test_a_click_stamped_in_the_future_wakes_the_wait_once_its_time_comes(engine: Engine) -> None:
    world = World(engine, shipped_with())
    warm(world, ANN)
    world.cycle(T0 + HOUR)
    world.cycle(T0 + 2 * HOUR)
    world.engage(ANN, "welcome", "click", T0 + 5 * HOUR)  # the provider's clock ahead of ours
    world.cycle(T0 + 3 * HOUR)
    assert welcome(world, ANN).branches == []
    world.cycle(T0 + 6 * HOUR)
    assert welcome(world, ANN).branches[0]["took"] == "then"


def test_reacting_lead_reads_the_json_branches_on_this_database(engine: Engine) -> None:
    world = World(engine, shipped_with())
    warm(world, ANN, BOB)
    world.cycle(T0 + HOUR)
    world.engage(ANN, "welcome", "click", T0 + 2 * HOUR)
    world.cycle(T0 + 3 * HOUR)
    with session_scope(engine) as session:
        assert reacting_lead(session=session) == ANN
    assert welcome(world, BOB).branches == []
