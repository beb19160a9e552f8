"""Operator controls as an operator runs them (real `nurture` processes), with real cycles around them.

`nurture enrollments`, `nurture sequences` and `nurture lead set-stage` act on the
database; the World helper then drives cycles (advance, take due steps, dispatch)
over simulated days, and the tests judge what reached the transport. Each test runs
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from db.models import Message, StageTransition
from nurture.playbook import load_playbook
from nurture.transports import InMemoryTransport
from tests.cli.test_cli import nurture
from tests.conftest import PLAYBOOK_PATH, TEMPLATES_DIR, straight_welcome
from tests.db.test_walking import ANN, HOUR, OPEN_POLICY
from tests.db.world import World

pytestmark = pytest.mark.usefixtures("nurture_env")

BOB = "bob@northwind.example"
CARA = "cara@northwind.example"
Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def playbook_file(tmp_path: Path) -> Path:
    """The shipped playbook with a straight welcome and without quiet hours, cap or send window
    (the walk is the subject here)."""
    old, new = OPEN_POLICY
    text = straight_welcome(PLAYBOOK_PATH.read_text())
    assert old in text
    path = tmp_path / "open.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.fixture
def cli(database_url: str, playbook_file: Path) -> Cli:
    """`nurture ARGS` on the test's database and playbook; ``expect`` is the exit code."""
    # Wide enough that rich wraps none of the messages checked here.
    env = {"NURTURE_DATABASE_URL": database_url, "NURTURE_PLAYBOOK": str(playbook_file), "COLUMNS": "400"}

    def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        return nurture(*args, env=env, expect=expect)

    return run


@pytest.fixture
def world(engine: Engine, playbook_file: Path) -> World:
    return World(engine, load_playbook(playbook_file, templates_dir=TEMPLATES_DIR))


def past(days: int) -> datetime:
    """A whole hour ``days`` ago: cycles replay the past, while the CLI stamps what it does with the real clock."""
    return (datetime.now(UTC) - timedelta(days=days)).replace(minute=0, second=0, microsecond=0)


def warm(world: World, email: str, at: datetime) -> None:
    world.lead(email, at=at, first_name="Ann", job_title="Head of Data", company_size=200, country="US")
    world.events(email, ("form_submit", at), ("pricing_view", at))


def subjects(world: World) -> list[str]:
    assert isinstance(world.transport, InMemoryTransport)
    return [email.subject for email in world.transport.sent]


def sent(world: World, email: str) -> dict[str, datetime]:
    """When each step of the lead's was sent."""
    return {m.step_id: m.sent_at for m in world.messages(email) if m.status == "sent"}


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


def test_help_lists_the_operator_commands(cli: Cli) -> None:
    help_text = cli("--help").stdout
    assert "Who walks which sequence: list enrollments, end some by hand." in help_text
    assert "The playbook's sequences and their enrollments: pause one, resume it." in help_text
    assert "One lead by hand: set its stage, recorded as a manual transition." in help_text
    assert "exit" in cli("enrollments", "--help").stdout
    assert "resume" in cli("sequences", "--help").stdout
    assert "set-stage" in cli("lead", "--help").stdout


def test_a_sequence_paused_through_the_cli_decides_and_sends_nothing_until_resumed(cli: Cli, world: World) -> None:
    start = past(30)
    warm(world, ANN, start)
    warm(world, BOB, start)
    world.cycle(start + HOUR)
    assert len(subjects(world)) == 2  # both welcomed

    paused = cli("sequences", "pause", "welcome", "--reason", "copy review").stdout
    assert "welcome paused: nothing new is decided or sent for it until `nurture sequences resume welcome`" in paused
    assert "its 2 active enrollments and 0 queued messages wait" in paused
    again = cli("sequences", "pause", "welcome", "--reason", "something else").stdout
    assert "welcome was already paused" in again
    assert "(copy review): nothing changed" in again

    # Ten days of cycles: Cara becomes warm meanwhile (enrolled, but nothing is decided for her).
    for day in range(1, 11):
        if day == 2:
            warm(world, CARA, start + timedelta(days=2))
        world.cycle(start + HOUR + timedelta(days=day))
    assert len(subjects(world)) == 2
    assert [m.step_id for m in world.messages(ANN)] == ["welcome"]
    assert [m.step_id for m in world.messages(CARA)] == []
    for email in (ANN, BOB):
        [enrollment] = world.enrollments(email)
        assert (enrollment.steps_done, enrollment.next_due_at) == (["welcome"], start + HOUR + timedelta(days=3))
    [cara] = world.enrollments(CARA)
    assert (cara.state, cara.steps_done) == ("active", [])

    sequences = {row["name"]: row for row in as_json(cli("sequences", "list", "--json"))}
    assert list(sequences) == ["welcome", "still_evaluating", "demo_offer", "win_back", "onboarding"]
    welcome = sequences["welcome"]
    assert (welcome["paused"], welcome["pause_reason"], welcome["active_enrollments"]) == (True, "copy review", 3)
    assert (welcome["triggers"], welcome["steps"], welcome["reentry"]) == ("cold → warm", 3, "once")
    assert not sequences["demo_offer"]["paused"]
    table = cli("sequences", "list").stdout
    assert "since" in table
    assert "copy review" in table
    listed = as_json(cli("enrollments", "list", "--sequence", "welcome", "--json"))
    assert [row["email"] for row in listed] == [CARA, BOB, ANN]  # most recent first
    assert all(row["paused"] for row in listed)
    assert "(paused)" in cli("enrollments", "list").stdout

    resumed = cli("sequences", "resume", "welcome").stdout
    assert "welcome resumed" in resumed
    assert "Enrollments due now: 3; each takes one step at the next cycle" in resumed
    assert "welcome is not paused: nothing changed" in cli("sequences", "resume", "welcome").stdout

    # The catch-up rule: one step per enrollment in the first cycle, then each step after its `after`.
    back = start + timedelta(days=11)
    world.cycle(back)
    assert Counter(m.lead_id for m in world.all(Message) if m.sent_at == back) == {
        world.row(ANN).id: 1,
        world.row(BOB).id: 1,
        world.row(CARA).id: 1,
    }
    assert list(sent(world, ANN)) == ["welcome", "case_study"]
    assert list(sent(world, CARA)) == ["welcome"]
    for hour in range(1, 24 * 4 + 1):
        world.cycle(back + hour * HOUR)
    for email in (ANN, BOB):
        assert sent(world, email)["webinar_invite"] - sent(world, email)["case_study"] == timedelta(days=4)
    assert sent(world, CARA)["case_study"] - sent(world, CARA)["welcome"] == timedelta(days=3)
    assert len(subjects(world)) == 2 + 3 + 2 + 1


def test_unknown_sequences_are_refused_with_the_known_names(cli: Cli) -> None:
    cli("db", "upgrade")
    refused = cli("sequences", "pause", "welcom", expect=1).stderr
    assert "no sequence 'welcom'" in refused
    assert "did you mean welcome?" in refused
    assert "the sequences are welcome, still_evaluating, demo_offer, win_back, onboarding" in refused
    assert "no sequence 'nope'" in cli("sequences", "resume", "nope", expect=1).stderr


def test_a_sequence_whose_template_broke_can_still_be_paused(
    cli: Cli, tmp_path: Path, database_url: str, playbook_file: Path
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    (templates / "case_study.html").unlink()
    env = {
        "NURTURE_DATABASE_URL": database_url,
        "NURTURE_PLAYBOOK": str(playbook_file),
        "NURTURE_TEMPLATES": str(templates),
    }
    nurture("db", "upgrade", env=env)
    assert "case_study" in nurture("validate", env=env, expect=1).stderr
    assert "welcome paused" in nurture("sequences", "pause", "welcome", "--reason", "broken template", env=env).stdout
    assert as_json(cli("sequences", "list", "--json"))[0]["paused"]


def test_an_enrollment_exited_through_the_cli_loses_its_queued_step_and_sends_nothing_more(
    cli: Cli, world: World, database_url: str, playbook_file: Path
) -> None:
    start = past(30)
    warm(world, ANN, start)
    warm(world, BOB, start + timedelta(days=1))
    world.cycle(start + HOUR)
    world.cycle(start + timedelta(days=1, hours=1))
    due = start + HOUR + timedelta(days=3)
    world.advance(due)  # Ann's case_study decided and queued, not yet sent

    [ann] = as_json(cli("enrollments", "list", "--lead", "Ann@Northwind.example", "--json"))
    assert (ann["sequence"], ann["state"], ann["steps_done"], ann["next_due_at"]) == (
        "welcome",
        "active",
        ["welcome", "case_study"],
        None,
    )
    assert (ann["step_in_flight"]["step_id"], ann["step_in_flight"]["status"]) == ("case_study", "queued")
    table = cli("enrollments", "list", "--lead", ANN).stdout
    assert "2: welcome, case_study" in table
    assert "step in flight (queued)" in table

    env = {**os.environ, "COLUMNS": "400", "NURTURE_DATABASE_URL": database_url, "NURTURE_PLAYBOOK": str(playbook_file)}
    declined = subprocess.run(
        [sys.executable, "-m", "nurture.cli", "enrollments", "exit", "--lead", ANN, "--reason", "asked for a call"],
        input="n\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert declined.returncode == 1, declined.stdout + declined.stderr
    assert "1 active enrollment to exit as `operator: asked for a call`; 1 queued message" in declined.stdout
    assert world.enrollments(ANN)[0].state == "active"

    done = cli(
        "enrollments", "exit", "--lead", ANN, "--sequence", "welcome", "--reason", "asked for a call", "--yes"
    ).stdout
    assert "1 enrollment exited (operator: asked for a call); 1 queued message cancelled" in done
    [enrollment] = world.enrollments(ANN)
    assert (enrollment.state, enrollment.exit_reason) == ("exited", "operator: asked for a call")
    cancelled = world.messages(ANN)[1]
    assert (cancelled.status, cancelled.last_error) == (
        "cancelled",
        "enrollment exited by an operator: asked for a call",
    )

    sent_before = len(subjects(world))
    for day in range(1, 12):
        world.cycle(due + timedelta(days=day))
    assert [m.step_id for m in world.messages(ANN)] == ["welcome", "case_study"]
    assert list(sent(world, ANN)) == ["welcome"]
    assert list(sent(world, BOB)) == ["welcome", "case_study", "webinar_invite"]  # Bob walks on
    assert len(subjects(world)) == sent_before + 2

    exited = as_json(cli("enrollments", "list", "--state", "exited", "--json"))
    assert [(row["email"], row["exit_reason"]) for row in exited] == [(ANN, "operator: asked for a call")]
    assert (
        "no active enrollment matches: nothing to exit"
        in cli("enrollments", "exit", "--lead", ANN, "--reason", "x").stdout
    )
    by_id = cli("enrollments", "exit", "--id", str(enrollment.id), "--reason", "x").stdout
    assert f"enrollment {enrollment.id} is exited already: left alone" in by_id


def test_a_bad_exit_selection_changes_nothing_and_says_why(cli: Cli, world: World) -> None:
    warm(world, ANN, past(3))
    world.cycle(past(3) + HOUR)
    assert "no lead with the address nobody@northwind.example" in (
        cli("enrollments", "exit", "--lead", "nobody@northwind.example", "--reason", "x", expect=1).stderr
    )
    assert "no enrollment with the id 999; nothing was changed" in (
        cli("enrollments", "exit", "--id", "1", "--id", "999", "--reason", "x", "--yes", expect=1).stderr
    )
    assert "say which enrollments" in cli("enrollments", "exit", "--reason", "x", expect=2).stderr
    assert "say why" in cli("enrollments", "exit", "--lead", ANN, "--reason", " ", expect=2).stderr
    assert (
        "--sequence narrows --lead"
        in cli("enrollments", "exit", "--sequence", "welcome", "--reason", "x", expect=2).stderr
    )
    assert "no lead with the address nobody@northwind.example" in (
        cli("enrollments", "list", "--lead", "nobody@northwind.example", expect=1).stderr
    )
    assert "a state is one of" in cli("enrollments", "list", "--state", "paused", expect=2).stderr
    assert [e.state for e in world.enrollments(ANN)] == ["active"]


def test_set_stage_records_a_manual_transition_and_the_next_cycle_sends_the_new_sequence(
    cli: Cli, world: World
) -> None:
    start = past(30)
    warm(world, ANN, start)
    world.cycle(start + HOUR)
    moved = cli("lead", "set-stage", "ANN@northwind.example", "hot", "--reason", "asked for a demo on the phone").stdout
    assert (
        f"{ANN}: warm → hot (manual: asked for a demo on the phone); exited welcome; enrolled in demo_offer; "
        "the next cycle sends its first step"
    ) in moved
    assert "not yet scored" not in moved
    last = world.all(StageTransition, ANN)[-1]
    assert (last.from_stage, last.to_stage, last.reason) == ("warm", "hot", "manual: asked for a demo on the phone")
    assert world.row(ANN).stage == "hot"
    welcome = next(e for e in world.enrollments(ANN) if e.sequence == "welcome")
    assert (welcome.state, welcome.exit_reason) == ("exited", "lead left warm for hot")

    world.cycle(datetime.now(UTC) + timedelta(minutes=1))
    assert subjects(world)[-1] == "See Acme Analytics on your own data"
    assert list(sent(world, ANN)) == ["welcome", "demo_offer"]
    assert world.row(ANN).stage == "hot"  # nothing new about Ann: the stage set by hand holds

    explained = as_json(cli("explain", ANN, "--json"))
    assert explained["transitions"][-1]["reason"] == "manual: asked for a demo on the phone"
    assert "is already hot" in cli("lead", "set-stage", ANN, "hot", "--reason", "again", expect=1).stderr

    assert "hot → customer (manual: signed); exited demo_offer; enrolled in onboarding" in (
        cli("lead", "set-stage", ANN, "customer", "--reason", "signed").stdout
    )
    transitions, enrollments = world.transitions(ANN), [(e.id, e.state) for e in world.enrollments(ANN)]
    refused = cli("lead", "set-stage", ANN, "warm", "--reason", "by mistake", expect=1).stderr
    assert f"{ANN} is a customer, and customer is final: no move leaves it" in refused
    assert world.transitions(ANN) == transitions
    assert [(e.id, e.state) for e in world.enrollments(ANN)] == enrollments
    assert world.row(ANN).stage == "customer"


def test_set_stage_says_which_sequences_wait_or_were_refused(cli: Cli, world: World) -> None:
    world.lead(BOB, at=past(2), first_name="Bob")
    world.cycle(past(2) + HOUR)  # scored: cold
    assert "bob@northwind.example: cold → warm (manual: booth chat); enrolled in welcome" in (
        cli("lead", "set-stage", BOB, "warm", "--reason", "booth chat").stdout
    )
    cooled = cli("lead", "set-stage", BOB, "cold", "--reason", "went quiet").stdout
    assert "warm → cold (manual: went quiet); exited welcome; enrolled in win_back; its first step is due" in cooled
    [win_back] = [e for e in world.enrollments(BOB) if e.sequence == "win_back"]
    assert win_back.next_due_at is not None
    assert f"its first step is due {win_back.next_due_at:%Y-%m-%d %H:%M} UTC" in cooled
    again = cli("lead", "set-stage", BOB, "warm", "--reason", "back").stdout
    assert (
        "cold → warm (manual: back); exited win_back; not enrolled in welcome: reentry: once (already enrolled" in again
    )

    cli("sequences", "pause", "demo_offer")
    hot = cli("lead", "set-stage", BOB, "hot", "--reason", "call").stdout
    assert "enrolled in demo_offer; paused: its first step waits for `nurture sequences resume demo_offer`" in hot


def test_set_stage_refuses_unknown_leads_and_stages_and_scores_changes_first(cli: Cli, world: World) -> None:
    cli("db", "upgrade")
    assert "no lead with the address 'nobody@northwind.example'" in (
        cli("lead", "set-stage", "nobody@northwind.example", "hot", "--reason", "x", expect=1).stderr
    )
    world.lead(CARA, at=past(1), first_name="Cara")  # imported, not yet scored
    assert "'lukewarm' is not a stage; one of cold, warm, hot, customer" in (
        cli("lead", "set-stage", CARA, "lukewarm", "--reason", "x", expect=2).stderr
    )
    assert "at most 200" in cli("lead", "set-stage", CARA, "hot", "--reason", "x" * 201, expect=2).stderr
    assert "say why with --reason" in cli("lead", "set-stage", CARA, "hot", "--reason", "  ", expect=1).stderr
    assert world.transitions(CARA) == []
    # Cara's import is scored as part of the move, so the next cycle has nothing to undo.
    assert "cold → hot (manual: x)" in cli("lead", "set-stage", CARA, "hot", "--reason", "x").stdout
    world.cycle(datetime.now(UTC) + timedelta(minutes=1))
    assert world.row(CARA).stage == "hot"
    assert world.transitions(CARA) == [("cold", "hot")]


def test_operator_commands_leave_prefect_unimported(cli: Cli, database_url: str) -> None:
    cli("db", "upgrade")
    script = (
        "import sys\n"
        "from nurture.cli import app\n"
        "for args in (['enrollments', 'list'], ['sequences', 'list'], ['sequences', 'pause', 'welcome'],\n"
        "             ['sequences', 'resume', 'welcome'], ['enrollments', 'exit', '--id', '1', '--reason', 'x'],\n"
        "             ['lead', 'set-stage', 'nobody@northwind.example', 'hot', '--reason', 'x']):\n"
        "    try:\n"
        "        app(args, standalone_mode=False)\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "NURTURE_DATABASE_URL": database_url},
        timeout=600,
        check=False,
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
