"""Sequences that react to the lead, decided by the core's pure planners: wait_for branches and split tests.

(Goals and unless / only_if conditions: tests/core/test_sequences.py.)
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from nurture.delivery import ClaimedMessage
from nurture.dispatching import Verdict, triage
from nurture.errors import PlaybookError
from nurture.playbook import Playbook, load_playbook, parse_playbook
from nurture.sequences import (
    Activity,
    Branch,
    EnrollmentSnapshot,
    EnrollmentState,
    SettledStep,
    Took,
    after_steps_settled,
    assign_variant,
    decide_due_steps,
)
from tests.conftest import PLAYBOOK_PATH, T0, TEMPLATES_DIR

SHIPPED = PLAYBOOK_PATH.read_text()
DAY = timedelta(days=1)


def snapshot(*done: str, settled: timedelta = timedelta(0), branches: tuple[Branch, ...] = ()) -> EnrollmentSnapshot:
    return EnrollmentSnapshot(
        id=7,
        lead_id=3,
        sequence="welcome",
        transition_id=11,
        steps_done=done,
        last_step_at=T0 + settled,
        branches=branches,
    )


def clicked_welcome(at: timedelta) -> dict[int, Activity]:
    return {7: Activity(clicked={"welcome": T0 + at})}


def test_the_shipped_welcome_waits_for_a_click_when_its_first_email_settles(playbook: Playbook) -> None:
    [change] = after_steps_settled([SettledStep(snapshot("welcome"))], playbook=playbook, at=T0)
    # Due at once, so the walk looks at what the lead already did; the deadline is within (3d) from now.
    assert (change.state, change.next_due_at, change.waiting_until) == (EnrollmentState.active, T0, T0 + 3 * DAY)


def test_a_click_within_the_wait_takes_then_and_its_after_counts_from_the_decision(playbook: Playbook) -> None:
    [change] = decide_due_steps(
        [snapshot("welcome")], playbook=playbook, now=T0 + DAY, activity=clicked_welcome(timedelta(hours=20))
    )
    assert change.branched == Branch("welcome", Took.then, "case_study", T0 + DAY)
    assert change.branches == (change.branched,)
    # case_study is 3d after the step before it: from the decision, so not sent yet; the nudge is jumped over.
    assert (change.send, change.next_due_at, change.last_step_at) == (None, T0 + 4 * DAY, T0 + DAY)
    assert change.waiting_until is None
    [later] = decide_due_steps(
        [snapshot("welcome", settled=DAY, branches=change.branches)], playbook=playbook, now=T0 + 4 * DAY
    )
    assert later.send is not None
    assert later.send.step_id == "case_study"
    assert later.steps_done == ("welcome", "case_study")


def test_no_click_by_the_deadline_takes_else_at_once(playbook: Playbook) -> None:
    [waiting] = decide_due_steps([snapshot("welcome")], playbook=playbook, now=T0 + DAY, activity={})
    assert (waiting.send, waiting.branched, waiting.next_due_at) == (None, None, T0 + 3 * DAY)
    assert waiting.waiting_until == T0 + 3 * DAY
    [change] = decide_due_steps([snapshot("welcome")], playbook=playbook, now=T0 + 3 * DAY, activity={})
    assert change.branched == Branch("welcome", Took.else_, "welcome_nudge", T0 + 3 * DAY)
    assert change.send is not None
    assert change.send.step_id == "welcome_nudge"  # after: 0h, so in the same decision


def test_a_click_after_within_takes_else(playbook: Playbook) -> None:
    late = clicked_welcome(3 * DAY + timedelta(minutes=1))
    [change] = decide_due_steps([snapshot("welcome")], playbook=playbook, now=T0 + 4 * DAY, activity=late)
    assert change.branched is not None
    assert change.branched.took == Took.else_
    # And a click that came in time but was seen late still takes then.
    in_time = clicked_welcome(3 * DAY - timedelta(minutes=1))
    [change] = decide_due_steps([snapshot("welcome")], playbook=playbook, now=T0 + 4 * DAY, activity=in_time)
    assert change.branched is not None
    assert change.branched.took == Took.then


def test_an_open_or_an_unrelated_event_does_not_satisfy_a_wait_for_a_click(playbook: Playbook) -> None:
    other = {7: Activity(opened={"welcome": T0 + DAY}, clicked={"case_study": T0 + DAY}, events={"email_click": T0})}
    [change] = decide_due_steps([snapshot("welcome")], playbook=playbook, now=T0 + 2 * DAY, activity=other)
    assert (change.branched, change.next_due_at) == (None, T0 + 3 * DAY)


def test_after_the_else_branch_the_walk_goes_on_in_order(playbook: Playbook) -> None:
    branched = (Branch("welcome", Took.else_, "welcome_nudge", T0 + 3 * DAY),)
    [settled] = after_steps_settled(
        [SettledStep(snapshot("welcome", "welcome_nudge", branches=branched))], playbook=playbook, at=T0 + 3 * DAY
    )
    assert settled.next_due_at == T0 + 6 * DAY  # case_study, 3d after the nudge
    assert settled.branches == branched


def _branching(then: str = "", else_: str = "", wait: str = "{clicked: welcome, within: 3d}") -> Playbook:
    text = SHIPPED.replace(
        "        then: case_study\n        else: welcome_nudge\n",
        (f"        then: {then}\n" if then else "") + (f"        else: {else_}\n" if else_ else ""),
    ).replace("{clicked: welcome, within: 3d}", wait)
    return parse_playbook(text)


def test_then_or_else_may_end_the_enrollment_and_each_defaults_to_the_next_step(playbook: Playbook) -> None:
    ends = _branching(then="end")
    [change] = decide_due_steps([snapshot("welcome")], playbook=ends, now=T0 + DAY, activity=clicked_welcome(DAY))
    assert change.state == EnrollmentState.completed
    assert change.branches == (Branch("welcome", Took.then, "end", T0 + DAY),)
    # Without an else, running out of time goes on in order: the nudge.
    [change] = decide_due_steps([snapshot("welcome")], playbook=ends, now=T0 + 3 * DAY, activity={})
    assert change.send is not None
    assert change.send.step_id == "welcome_nudge"


def test_a_branch_to_a_removed_step_goes_on_in_order_and_a_removed_wait_no_longer_waits(playbook: Playbook) -> None:
    branched = (Branch("welcome", Took.then, "case_study", T0 + DAY),)
    no_case_study = parse_playbook(
        SHIPPED.replace("then: case_study", "then: webinar_invite").replace(
            "      - after: 3d\n        template: case_study\n"
            '        subject: "How Northwind cut time-to-insight by 60%"\n'
            '        preheader: "From a week of waiting per report'
            ' to answers their product managers find themselves."\n',
            "",
        )
    )
    [change] = decide_due_steps(
        [snapshot("welcome", settled=DAY, branches=branched)], playbook=no_case_study, now=T0 + DAY
    )
    assert change.send is not None
    assert change.send.step_id == "welcome_nudge"
    without_wait = parse_playbook(
        SHIPPED.replace("        wait_for: {clicked: welcome, within: 3d}\n", "").replace(
            "        then: case_study\n        else: welcome_nudge\n", ""
        )
    )
    [change] = decide_due_steps([snapshot("welcome")], playbook=without_wait, now=T0, activity={})
    assert (change.branched, change.send and change.send.step_id) == (None, "welcome_nudge")


def test_a_wait_for_an_event_since_enrolling(playbook: Playbook) -> None:
    on_event = _branching(wait="{event: webinar_attended, within: 2d}")
    attended = {7: Activity(events={"webinar_attended": T0 + DAY})}
    [change] = decide_due_steps([snapshot("welcome")], playbook=on_event, now=T0 + DAY, activity=attended)
    assert change.branched is not None
    assert change.branched.took == Took.then


BAD_BRANCHES = [
    ("then: case_study", "then: welcome", "then: 'welcome' is not a step after this one"),
    ("else: welcome_nudge", "else: nowhere", "else: 'nowhere' is not a step after this one"),
    ("{clicked: welcome, within: 3d}", "{clicked: case_study, within: 3d}", "not this step or one before it"),
    ("{clicked: welcome, within: 3d}", "{clicked: welcome, within: 0h}", "wait for some time"),
    ("{clicked: welcome, within: 3d}", "{clicked: welcome}", "wait_for.within: Field required"),
    ("{clicked: welcome, within: 3d}", "{clicked: welcome, opened: welcome, within: 3d}", "exactly one of"),
    ("        wait_for: {clicked: welcome, within: 3d}\n", "", "then / else say where to go after a wait_for"),
]


@pytest.mark.parametrize(("old", "new", "problem"), BAD_BRANCHES)
def test_a_bad_branch_names_its_line(old: str, new: str, problem: str) -> None:
    with pytest.raises(PlaybookError) as error:
        parse_playbook(SHIPPED.replace(old, new, 1), source="nurture.yaml")
    [message] = error.value.problems
    assert message.startswith("nurture.yaml:")
    assert "sequences.welcome.steps" in message
    assert problem in message


def test_variants_split_within_two_points_of_their_weights_over_10000_leads(playbook: Playbook) -> None:
    step = playbook.sequences["welcome"].steps[0]
    split = Counter(assign_variant(step, lead_id=lead, sequence="welcome").id for lead in range(1, 10_001))  # type: ignore[union-attr]
    assert abs(split["a"] / 10_000 - 0.5) < 0.02
    assert abs(split["b"] / 10_000 - 0.5) < 0.02
    uneven = parse_playbook(SHIPPED.replace("weight: 50", "weight: 70", 1).replace("weight: 50", "weight: 30", 1))
    step = uneven.sequences["welcome"].steps[0]
    split = Counter(assign_variant(step, lead_id=lead, sequence="welcome").id for lead in range(1, 10_001))  # type: ignore[union-attr]
    assert abs(split["a"] / 10_000 - 0.7) < 0.02
    assert abs(split["b"] / 10_000 - 0.3) < 0.02
    assert assign_variant(playbook.sequences["demo_offer"].steps[0], lead_id=1, sequence="demo_offer") is None


def test_a_variant_is_stable_on_replay_and_decided_with_the_step(playbook: Playbook) -> None:
    step = playbook.sequences["welcome"].steps[0]
    first = [assign_variant(step, lead_id=lead, sequence="welcome") for lead in range(1, 200)]
    again = [
        assign_variant(parse_playbook(SHIPPED).sequences["welcome"].steps[0], lead_id=lead, sequence="welcome")
        for lead in range(1, 200)
    ]
    assert first == again
    for lead_id in (3, 4, 5, 6):
        start = EnrollmentSnapshot(7, lead_id, "welcome", 11, (), T0)
        [change] = decide_due_steps([start], playbook=playbook, now=T0)
        assert change.send is not None
        variant = assign_variant(step, lead_id=lead_id, sequence="welcome")
        assert variant is not None
        assert (change.send.variant, change.send.template, change.send.subject) == (
            variant.id,
            variant.template,
            variant.subject,
        )


def _claimed(variant: str | None, lead_id: int = 3) -> ClaimedMessage:
    return ClaimedMessage(1, lead_id, "welcome", "welcome", 0, T0, "ann@x.example", "UTC", None, variant=variant)


def test_a_queued_message_sends_its_variant_or_the_one_the_test_gives_now(playbook: Playbook) -> None:
    # T0 is a Monday morning: inside the send window, outside quiet hours.
    [verdict] = triage([_claimed("b")], playbook=playbook, recent_sends={}, now=T0)
    b = playbook.sequences["welcome"].steps[0].variant("b")
    assert b is not None
    assert (verdict.verdict, verdict.variant, verdict.subject) == (Verdict.send, "b", b.subject)
    # The variant was removed from the test since: the lead gets the one the test assigns now.
    renamed = parse_playbook(SHIPPED.replace("          - id: b\n", "          - id: c\n"))
    [verdict] = triage([_claimed("b")], playbook=renamed, recent_sends={}, now=T0)
    expected = assign_variant(renamed.sequences["welcome"].steps[0], lead_id=3, sequence="welcome")
    assert expected is not None
    assert (verdict.verdict, verdict.variant, verdict.subject) == (Verdict.send, expected.id, expected.subject)
    # The test ended (one template again): the step's content, and no variant.
    test = SHIPPED[SHIPPED.index("        # A split test") : SHIPPED.index("        # Who clicks")]
    ended = parse_playbook(SHIPPED.replace(test, '        template: welcome\n        subject: "Hello"\n'))
    [verdict] = triage([_claimed("b")], playbook=ended, recent_sends={}, now=T0)
    assert (verdict.verdict, verdict.variant, verdict.template, verdict.subject) == (
        Verdict.send,
        None,
        "welcome",
        "Hello",
    )


BAD_VARIANTS = [
    ("          - id: b\n", "          - id: a\n", "variants need different ids"),
    (
        "        variants:\n",
        "        template: welcome\n        variants:\n",
        "takes its template and subject from each",
    ),
    ("      - id: welcome\n        after: 0h\n", "      - after: 0h\n", "needs its own `id:`"),
    ("weight: 50", "weight: -1", "greater than or equal to 0"),
    ("          - id: b\n", "          - id: 'b c'\n", "is not a variant id"),
    ("        judged_on: opened\n", "        judged_on: opens\n", "'opened', 'clicked' or 'converted'"),
    (
        "        template: welcome_nudge\n",
        "        template: welcome_nudge\n        judged_on: clicked\n",
        "judged_on says what decides a split test: it needs variants",
    ),
]


@pytest.mark.parametrize(("old", "new", "problem"), BAD_VARIANTS)
def test_a_bad_split_test_names_its_line(old: str, new: str, problem: str) -> None:
    with pytest.raises(PlaybookError) as error:
        parse_playbook(SHIPPED.replace(old, new, 1), source="nurture.yaml")
    assert any(m.startswith("nurture.yaml:") and problem in m for m in error.value.problems), error.value.problems


def test_weights_all_zero_or_a_single_variant_are_refused() -> None:
    zero = SHIPPED.replace("weight: 50", "weight: 0")
    with pytest.raises(PlaybookError, match="at least one variant needs a weight above 0"):
        parse_playbook(zero)
    start = SHIPPED.index("          - id: b\n")
    single = SHIPPED[:start] + SHIPPED[SHIPPED.index("        # Who clicks") :]
    with pytest.raises(PlaybookError, match="at least two variants"):
        parse_playbook(single)


def test_a_variant_whose_template_is_missing_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "nurture.yaml"
    text = SHIPPED.replace(
        "          - id: b\n            template: welcome\n", "          - id: b\n            template: welcom\n"
    )
    path.write_text(text)
    with pytest.raises(PlaybookError) as error:
        load_playbook(path, templates_dir=TEMPLATES_DIR)
    [problem] = error.value.problems
    line = text.splitlines().index("            template: welcom") + 1
    assert problem.startswith(f"{path}:{line}: sequences.welcome.steps.0.variants.1.template: template 'welcom' has no")


B_SUBJECT = "subject: \"{{ lead.first_name or 'Hi' }}, your first {{ brand.name }} dashboard takes an afternoon\""


def test_a_variant_with_an_empty_subject_is_refused() -> None:
    """As for a plain step: an arm without a subject would send emails with none."""
    assert B_SUBJECT in SHIPPED
    with pytest.raises(PlaybookError):
        parse_playbook(SHIPPED.replace(B_SUBJECT, 'subject: ""'), source="nurture.yaml")


def test_a_variant_with_an_empty_template_is_refused_by_the_playbook_check() -> None:
    """Refused when the playbook is read, not only by the check that the template files exist."""
    old = "          - id: b\n            template: welcome\n"
    assert old in SHIPPED
    with pytest.raises(PlaybookError):
        parse_playbook(SHIPPED.replace(old, "          - id: b\n            template: ''\n"), source="nurture.yaml")


def test_a_bad_then_names_the_line_of_then() -> None:
    """A problem between steps points at the key it is about (the ``then:``), not at ``steps:``."""
    line = SHIPPED[: SHIPPED.index("then: case_study")].count("\n") + 1
    with pytest.raises(PlaybookError) as error:
        parse_playbook(SHIPPED.replace("then: case_study", "then: case_studdy", 1), source="nurture.yaml")
    [message] = error.value.problems
    assert message.startswith(f"nurture.yaml:{line}:"), message
