"""Walking a sequence one step at a time under the playbook as it is now; reentry; the keys that stop duplicates."""

from __future__ import annotations

from datetime import timedelta

import pytest

from nurture.errors import PlaybookError
from nurture.playbook import Playbook, Stage, parse_playbook
from nurture.sequences import (
    EnrollmentSnapshot,
    EnrollmentState,
    SettledStep,
    Transition,
    after_steps_settled,
    decide_due_steps,
    exits_on_transition,
    idempotency_key,
    next_step,
    plan_enrollments,
)
from tests.conftest import PLAYBOOK_PATH, T0, straight_welcome


def edited(playbook_text: str, old: str, new: str) -> Playbook:
    assert old in playbook_text
    return parse_playbook(playbook_text.replace(old, new))


@pytest.fixture
def text() -> str:
    """The shipped playbook with a straight welcome (the branch and split test have tests of their own)."""
    return straight_welcome(PLAYBOOK_PATH.read_text())


@pytest.fixture
def playbook(text: str) -> Playbook:
    return parse_playbook(text)


def snapshot(*done: str, sequence: str = "welcome", last: timedelta = timedelta(0)) -> EnrollmentSnapshot:
    return EnrollmentSnapshot(
        id=7, lead_id=3, sequence=sequence, transition_id=11, steps_done=done, last_step_at=T0 + last
    )


def test_step_ids_default_to_the_template_and_must_be_unique(playbook: Playbook, text: str) -> None:
    assert [s.id for s in playbook.sequences["welcome"].steps] == ["welcome", "case_study", "webinar_invite"]
    twice = text.replace("        template: case_study", "        template: welcome", 1)
    with pytest.raises(PlaybookError) as error:
        parse_playbook(twice, source="nurture.yaml")
    problem = error.value.problems[0]
    assert "sequences.welcome.steps" in problem
    assert "same id 'welcome'" in problem
    assert problem.startswith("nurture.yaml:")


def test_the_next_step_is_the_one_after_the_last_taken_that_still_exists(playbook: Playbook, text: str) -> None:
    welcome = playbook.sequences["welcome"]
    assert next_step(welcome, ()) == (0, welcome.steps[0])
    assert next_step(welcome, ("welcome",)) == (1, welcome.steps[1])
    assert next_step(welcome, ("welcome", "case_study", "webinar_invite")) is None
    # The next step was removed: the one after it.
    removed = parse_playbook(_without_step(text, "case_study"))
    seq = removed.sequences["welcome"]
    assert next_step(seq, ("welcome",)) == (1, seq.steps[1])
    assert seq.steps[1].id == "webinar_invite"
    # The last step taken was removed too: the first step not taken.
    assert next_step(seq, ("case_study",)) == (0, seq.steps[0])


def _without_step(text: str, template: str) -> str:
    """The playbook text without the step that sends ``template`` (its lines and a comment above)."""
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.strip() == f"template: {template}")
    start, end = at - 1, at + 1
    while lines[start - 1].strip().startswith("#"):
        start -= 1
    while end < len(lines) and lines[end].startswith("        "):
        end += 1
    return "".join(lines[:start] + lines[end:])


def test_a_reordered_sequence_walks_on_from_where_the_lead_is_and_never_repeats_a_step(playbook: Playbook) -> None:
    welcome = playbook.sequences["welcome"]
    reordered = welcome.model_copy(update={"steps": (welcome.steps[2], welcome.steps[0], welcome.steps[1])})
    # welcome and case_study taken; webinar_invite moved before them: the lead has walked past it.
    assert next_step(reordered, ("welcome", "case_study")) is None
    # Only welcome taken: case_study comes after it, and welcome is not sent again.
    found = next_step(reordered, ("welcome",))
    assert found is not None
    assert found[1].id == "case_study"


def test_a_due_step_is_queued_with_its_id_and_the_playbook_version(playbook: Playbook) -> None:
    [change] = decide_due_steps([snapshot("welcome", last=timedelta(days=-3))], playbook=playbook, now=T0)
    assert change.state == EnrollmentState.active
    assert change.next_due_at is None  # waits for this step to settle
    assert change.steps_done == ("welcome", "case_study")
    send = change.send
    assert send is not None
    assert (send.step_id, send.position, send.template) == ("case_study", 1, "case_study")
    assert send.playbook_version == playbook.version
    assert send.idempotency_key == "lead-3/welcome/transition-11/step:case_study"
    assert send.due_at == T0


def test_a_step_whose_after_grew_waits_and_a_finished_or_removed_sequence_ends(playbook: Playbook, text: str) -> None:
    longer = edited(
        text, "      - after: 3d\n        template: case_study", "      - after: 5d\n        template: case_study"
    )
    [change] = decide_due_steps([snapshot("welcome", last=timedelta(days=-3))], playbook=longer, now=T0)
    assert change.send is None
    assert change.next_due_at == T0 + timedelta(days=2)
    [done] = decide_due_steps([snapshot("welcome", "case_study", "webinar_invite")], playbook=playbook, now=T0)
    assert (done.state, done.send) == (EnrollmentState.completed, None)
    [gone] = decide_due_steps([snapshot("welcome", sequence="retired")], playbook=playbook, now=T0)
    assert gone.state == EnrollmentState.exited
    assert gone.reason == "sequence removed from the playbook"


def test_after_counts_from_when_the_previous_step_settled(playbook: Playbook) -> None:
    settled_at = T0 + timedelta(days=9)  # sent late, after downtime
    [moved, suppressed, last] = after_steps_settled(
        [
            SettledStep(snapshot("welcome")),
            SettledStep(snapshot("welcome"), suppressed=True),
            SettledStep(snapshot("welcome", "case_study", "webinar_invite")),
        ],
        playbook=playbook,
        at=settled_at,
    )
    assert moved.next_due_at == settled_at + timedelta(days=3)
    assert moved.last_step_at == settled_at
    assert (suppressed.state, suppressed.reason) == (EnrollmentState.exited, "address suppressed")
    assert last.state == EnrollmentState.completed


def _transition(lead: int = 3, tid: int = 20) -> Transition:
    return Transition(lead_id=lead, from_stage=Stage.cold, to_stage=Stage.warm, transition_id=tid)


@pytest.mark.parametrize(
    ("rule", "last", "enters"),
    [
        ("once", None, True),
        ("once", T0 - timedelta(days=400), False),
        ("always", T0 - timedelta(hours=1), True),
        ("{after: 30d}", T0 - timedelta(days=29), False),
        ("{after: 30d}", T0 - timedelta(days=31), True),
    ],
)
def test_reentry_rules(text: str, rule: str, last: object, enters: bool) -> None:
    playbook = edited(text, "    reentry: once\n    # The welcome", f"    reentry: {rule}\n    # The welcome")
    last_enrolled = {} if last is None else {(3, "welcome"): last}
    [planned] = plan_enrollments([_transition()], playbook=playbook, now=T0, last_enrolled=last_enrolled)  # type: ignore[dict-item]
    assert planned.state == (EnrollmentState.active if enters else EnrollmentState.skipped)
    if enters:
        assert planned.next_due_at == T0  # the first step's after (0h) counts from the stage change
    else:
        assert (planned.reason or "").startswith("reentry:")


def test_the_default_reentry_is_once_per_30_days(text: str) -> None:
    playbook = parse_playbook(text.replace("    reentry: once\n    # The welcome", "    # The welcome"))
    assert playbook.sequences["welcome"].reentry.describe() == "after 30d"
    # Two transitions of one chunk count too: the second is refused.
    planned = plan_enrollments([_transition(tid=1), _transition(tid=2)], playbook=playbook, now=T0, last_enrolled={})
    assert [p.state for p in planned] == [EnrollmentState.active, EnrollmentState.skipped]


@pytest.mark.parametrize(
    "bad",
    ["reentry: twice", "reentry: {after: soon}", "reentry: {every: 3d}"],
)
def test_a_bad_reentry_rule_names_its_line(text: str, bad: str) -> None:
    with pytest.raises(PlaybookError) as error:
        parse_playbook(
            text.replace("    reentry: once\n    # The welcome", f"    {bad}\n    # The welcome", 1),
            source="nurture.yaml",
        )
    assert any("sequences.welcome.reentry" in p and p.startswith("nurture.yaml:") for p in error.value.problems)


def test_idempotency_keys_use_the_step_id() -> None:
    keys = {
        idempotency_key(lead_id=lead, sequence="welcome", transition_id=t, step_id=s)
        for lead in (1, 2)
        for t in (10, 11)
        for s in ("welcome", "case_study", "0")
    }
    assert len(keys) == 12
    # Never equal to a key of the positional scheme used before step ids.
    assert not any(key.endswith("/step-0") for key in keys)


def test_leaving_the_stage_exits_the_sequence() -> None:
    assert exits_on_transition(Stage.warm, Stage.hot)
    assert exits_on_transition(Stage.hot, Stage.customer)
    assert not exits_on_transition(Stage.hot, Stage.hot)


def test_a_goal_event_since_enrolling_converts_and_credits_the_last_settled_step(playbook: Playbook) -> None:
    from nurture.scoring import ActivityEvent
    from nurture.sequences import GoalCandidate, goal_kinds, reached_goals

    assert goal_kinds(playbook) == {"demo_request", "purchase"}
    waiting = GoalCandidate(snapshot("welcome", "case_study"), started_at=T0, in_flight=False)
    in_flight = GoalCandidate(snapshot("welcome", "case_study"), started_at=T0, in_flight=True)
    events = {
        3: [
            ActivityEvent("demo_request", T0 - timedelta(days=1)),  # before enrolling: does not count
            ActivityEvent("page_view", T0 + timedelta(days=2)),
            ActivityEvent("demo_request", T0 + timedelta(days=5)),
            ActivityEvent("demo_request", T0 + timedelta(days=4)),
        ]
    }
    [converted] = reached_goals([waiting], events=events, playbook=playbook)
    assert (converted.kind, converted.at, converted.after_step) == (
        "demo_request",
        T0 + timedelta(days=4),
        "case_study",
    )
    assert converted.reason == "goal reached: demo_request on 2026-03-06 09:00 UTC"
    # The step in flight is cancelled by the conversion: the credit goes to the one before.
    assert reached_goals([in_flight], events=events, playbook=playbook)[0].after_step == "welcome"
    assert reached_goals([waiting], events={3: events[3][:2]}, playbook=playbook) == []


def test_a_step_whose_condition_fails_is_skipped_with_the_reason_and_the_walk_goes_on(text: str) -> None:
    from nurture.sequences import Activity

    playbook = edited(
        text,
        "        template: case_study\n",
        "        template: case_study\n        unless: {clicked: welcome}\n        only_if: {event: pricing_view}\n",
    )
    due = snapshot("welcome", last=timedelta(days=-3))
    [clicked] = decide_due_steps(
        [due],
        playbook=playbook,
        now=T0,
        activity={7: Activity(clicked={"welcome": T0}, events={"pricing_view": T0})},
    )
    assert clicked.send is not None
    assert clicked.send.skipped == "skipped: unless clicked welcome, and the lead did"
    # Settled at once: the next step is due after its own delay, from now.
    assert (clicked.steps_done, clicked.last_step_at, clicked.next_due_at) == (
        ("welcome", "case_study"),
        T0,
        T0 + timedelta(days=4),
    )
    [quiet] = decide_due_steps([due], playbook=playbook, now=T0, activity={})
    assert quiet.send is not None
    assert quiet.send.skipped == "skipped: only if event pricing_view, and the lead did not"
    [sent] = decide_due_steps([due], playbook=playbook, now=T0, activity={7: Activity(events={"pricing_view": T0})})
    assert sent.send is not None
    assert (sent.send.skipped, sent.next_due_at) == (None, None)


@pytest.mark.parametrize(
    ("condition", "problem"),
    [
        ("unless: {clicked: webinar_invite}", "not a step before this one"),
        ("unless: {clicked: case_study}", "not a step before this one"),
        ("only_if: {opened: welcome, event: x}", "exactly one of"),
        ("only_if: {liked: welcome}", "unknown key"),
    ],
)
def test_a_condition_on_a_later_or_unknown_step_names_its_line(text: str, condition: str, problem: str) -> None:
    broken = text.replace("        template: case_study\n", f"        template: case_study\n        {condition}\n", 1)
    with pytest.raises(PlaybookError) as error:
        parse_playbook(broken, source="nurture.yaml")
    assert any(p.startswith("nurture.yaml:") and problem in p for p in error.value.problems), error.value.problems


@pytest.mark.parametrize("name", ["still evaluating", "a/b", "x" * 101])
def test_a_sequence_name_the_database_cannot_keep_names_its_line(text: str, name: str) -> None:
    with pytest.raises(PlaybookError) as error:
        parse_playbook(text.replace("  still_evaluating:", f"  {name}:", 1), source="nurture.yaml")
    assert any(p.startswith("nurture.yaml:") and "is not a sequence name" in p for p in error.value.problems)
