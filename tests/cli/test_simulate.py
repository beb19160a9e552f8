"""`nurture simulate` on a database a few weeks of cycles filled: the impact of a change, and nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, select, text
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

from db.engine import get_engine, session_scope, upgrade_schema
from db.imports import add_events, upsert_leads
from db.inbound import ingest_provider_events
from db.reports import emails_sent_between
from nurture.inbound import parse_sendgrid_batch
from nurture.playbook import load_playbook
from nurture.population import engagement_events, generate_population
from tests.cli.runner import run_nurture
from tests.conftest import PLAYBOOK_PATH, TEMPLATES_DIR
from tests.db.world import World

NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
START = NOW - timedelta(weeks=4)
WARM = "warm: {enter_at: 40, leave_below: 30}"
LOWERED = "warm: {enter_at: 25, leave_below: 20}"


def filled(url: str) -> Engine:
    """250 leads of the demo's population, with four weeks of their events, walked by a cycle every day
    (opens and clicks of the emails reported back as SendGrid would): enrollments in flight, messages."""
    engine = get_engine(url)
    upgrade_schema(engine)
    population = generate_population(leads=250, start=START, end=NOW, seed=13)
    with session_scope(engine) as session:
        upsert_leads(session=session, records=population.leads, now=START)
        add_events(session=session, records=population.events, now=START)
    world = World(engine, load_playbook(PLAYBOOK_PATH, templates_dir=TEMPLATES_DIR))
    pending: list[dict[str, Any]] = []
    at = START
    while at < NOW:
        at += timedelta(days=1)
        due = [e for e in pending if e["timestamp"] <= at.timestamp()]
        pending = [e for e in pending if e["timestamp"] > at.timestamp()]
        if due:
            with session_scope(engine) as session:
                ingest_provider_events(session=session, events=parse_sendgrid_batch(due).events, now=at)
        world.cycle(at)
        with session_scope(engine) as session:
            sent = emails_sent_between(session=session, start=at - timedelta(days=1), end=at)
        pending.extend(engagement_events(sent, personas=population.personas, seed=13))
    return engine


def dump(engine: Engine) -> dict[str, str]:
    """Every table's rows, in key order, hashed: equal dumps mean an unchanged database."""
    tables = MetaData()
    tables.reflect(bind=engine)
    assert set(SQLModel.metadata.tables) <= set(tables.tables)
    digests: dict[str, str] = {}
    with engine.connect() as conn:
        for name, table in sorted(tables.tables.items()):
            rows = conn.execute(select(table).order_by(*table.primary_key.columns or table.columns)).all()
            digests[name] = f"{len(rows)} rows, " + hashlib.sha256(repr(rows).encode()).hexdigest()
    return digests


def sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    return Path(parsed.database or "") if parsed.get_backend_name() == "sqlite" else None


def simulate(url: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    settings = {
        "NURTURE_DATABASE_URL": url,
        "NURTURE_PLAYBOOK": str(PLAYBOOK_PATH),
        "NURTURE_TEMPLATES": str(TEMPLATES_DIR),
    }
    return run_nurture("simulate", "--now", NOW.isoformat(), *args, env=settings, expect=expect)


def differences(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "stages": report["leads_in_another_stage"],
        "emails": report["leads_with_other_emails"],
        "matrix": report["stage_matrix"],
        "sent": {(r["sequence"], r["step"]): r["sent"]["difference"] for r in report["emails"]},
        "go_live": report["go_live"],
        "in_flight": report["in_flight"]["affected"],
    }


def test_a_lowered_warm_threshold_shows_its_impact_and_the_database_is_unchanged(
    database_url: str, tmp_path: Path
) -> None:
    engine = filled(database_url)
    with engine.connect() as conn:
        active = conn.execute(text("SELECT count(*) FROM enrollment WHERE state = 'active'")).scalar_one()
        clicks = conn.execute(text("SELECT count(*) FROM event WHERE kind = 'email_click'")).scalar_one()
    assert active > 0
    assert clicks > 0
    before = dump(engine)
    engine.dispose()  # SQLite: the last connection closing writes the WAL into the file, before its bytes are read
    path = sqlite_file(database_url)
    file_bytes = path.read_bytes() if path else b""
    lowered = tmp_path / "lowered.yaml"
    text_ = PLAYBOOK_PATH.read_text()
    assert WARM in text_
    lowered.write_text(text_.replace(WARM, LOWERED))

    report = json.loads(simulate(database_url, "--playbook", str(lowered), "--json", "--top", "5").stdout)

    assert report["leads"] == 250
    matrix = {(m["from"], m["to"]): m["leads"] for m in report["stage_matrix"]}
    assert matrix.get(("cold", "warm"), 0) > 0
    assert report["leads_in_another_stage"] == sum(matrix.values())
    welcome = {r["step"]: r for r in report["emails"] if r["sequence"] == "welcome"}
    assert welcome["welcome"]["sent"]["new"] > welcome["welcome"]["sent"]["current"]
    assert sum(r["sent"]["difference"] for r in welcome.values()) > 0
    transitions = {
        side: {(t["from"], t["to"]): t["count"] for t in report["transitions"][side]} for side in report["transitions"]
    }
    assert transitions["new"][("cold", "warm")] > transitions["current"][("cold", "warm")]
    # Going live, the first cycle's rescore would warm up leads the current playbook leaves cold.
    assert {(m["from"], m["to"]) for m in report["go_live"]} == {("cold", "warm")}
    most = report["most_affected"]
    assert len(most) == 5
    assert all("@" in lead["email"] for lead in most)
    assert most[0]["stage"] == {"current": "cold", "new": "warm"}

    # The window starts before the first lead arrived: the change in force from the start is the same change.
    whole = json.loads(
        simulate(database_url, "--playbook", str(lowered), "--json", "--top", "5", "--whole-history").stdout
    )
    assert whole == report

    # The text report says the same, for a person.
    shown = simulate(database_url, "--playbook", str(lowered)).stdout
    assert "Leads in another stage now" in shown
    assert "welcome" in shown
    assert most[0]["email"] in shown

    # The same playbook against itself: no difference at all.
    same = json.loads(simulate(database_url, "--json").stdout)
    assert differences(same) == {
        "stages": 0,
        "emails": 0,
        "matrix": [],
        "sent": dict.fromkeys(differences(same)["sent"], 0),
        "go_live": [],
        "in_flight": 0,
    }
    assert same["emails_total"]["sent"]["current"] > 0
    assert same["most_affected"] == []

    # The other way round (--current names the live one): the same leads, from warm back to cold.
    back = json.loads(
        simulate(database_url, "--current", str(lowered), "--playbook", str(PLAYBOOK_PATH), "--json").stdout
    )
    assert {(m["from"], m["to"]): m["leads"] for m in back["stage_matrix"]} == {
        ("warm", "cold"): matrix[("cold", "warm")]
    }

    assert dump(get_engine(database_url)) == before
    if path is not None:
        assert path.read_bytes() == file_bytes


def test_removing_a_sequence_ends_its_enrollments_in_flight(database_url: str, tmp_path: Path) -> None:
    engine = filled(database_url)
    with engine.connect() as conn:
        welcomes = conn.execute(
            text("SELECT count(*) FROM enrollment WHERE state = 'active' AND sequence = 'welcome'")
        ).scalar_one()
    assert welcomes > 0
    text_ = PLAYBOOK_PATH.read_text()
    start, end = text_.index("  welcome:\n"), text_.index("  still_evaluating:\n")
    without = tmp_path / "no-welcome.yaml"
    without.write_text(text_[:start] + text_[end:])

    report = json.loads(simulate(database_url, "--playbook", str(without), "--json").stdout)

    by_change = {(c["sequence"], c["change"]): c["enrollments"] for c in report["in_flight"]["by_change"]}
    assert by_change == {("welcome", "sequence removed"): welcomes}
    assert all(r["sent"]["new"] == 0 for r in report["emails"] if r["sequence"] == "welcome")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("half_life: 14d", "half_life: fortnight"), ": scoring.half_life: 'fortnight' is not a duration"),
        (("template: check_in", "template: check_inn"), "template 'check_inn' has no"),
    ],
)
def test_a_broken_new_playbook_is_reported_like_validate_does(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    url = f"sqlite:///{tmp_path / 'nurture.db'}"
    broken = tmp_path / "broken.yaml"
    broken.write_text(PLAYBOOK_PATH.read_text().replace(*edit))
    result = simulate(url, "--playbook", str(broken), expect=1)
    assert str(broken) in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "nurture.db").exists()


def test_broken_templates_are_reported_like_validate_does(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    (templates / "check_in.txt").write_text("Hi {{ lead.first_name \n")
    result = simulate(f"sqlite:///{tmp_path / 'nurture.db'}", "--templates", str(templates), expect=1)
    assert "check_in.txt" in result.stderr


def test_a_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    result = simulate(f"sqlite:///{tmp_path / 'nurture.db'}", expect=1)
    assert "there is no database at" in result.stderr
    assert not (tmp_path / "nurture.db").exists()


def test_simulate_starts_no_prefect(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nurture.db'}"
    upgrade_schema(get_engine(url))
    probe = (
        "import sys, atexit\n"
        "loaded = lambda: any(m.split('.')[0] == 'prefect' for m in sys.modules)\n"
        "atexit.register(lambda: print('prefect' if loaded() else 'no prefect'))\n"
        "sys.argv = ['nurture', 'simulate', '--json']\n"
        "from nurture.cli import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "NURTURE_DATABASE_URL": url,
            "NURTURE_PLAYBOOK": str(PLAYBOOK_PATH),
            "NURTURE_TEMPLATES": str(TEMPLATES_DIR),
        },
        timeout=120,
        check=True,
    )
    report, verdict = result.stdout.rsplit("}", 1)
    assert json.loads(report + "}")["leads"] == 0
    assert verdict.strip() == "no prefect"
