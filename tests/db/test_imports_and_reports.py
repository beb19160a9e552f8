"""Imports keep good rows and report bad ones; status and explain tell the story."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from db.engine import ensure_current_schema, get_engine, session_scope
from db.imports import import_file
from db.models import Lead
from db.reports import explain_lead, funnel
from nurture.errors import SchemaOutOfDateError
from nurture.playbook import Playbook
from tests.conftest import T0
from tests.db.world import World


def test_leads_are_upserted_by_normalised_email(engine: Engine, tmp_path: Path) -> None:
    first = tmp_path / "leads.csv"
    first.write_text(
        "email,first_name,company_size,timezone,industry\n"
        "Ann@Northwind.example,Ann,200,Europe/Berlin,saas\n"
        "not-an-email,Bob,10,,retail\n"
        "cara@delta.example,Cara,lots,,retail\n"
        "dan@echo.example,Dan,,,\n"
    )
    result = import_file(engine=engine, path=first, kind="leads", now=T0)
    assert (result.rows_read, result.rows_kept, result.created, result.updated) == (4, 2, 2, 0)
    assert [(p.line, p.reason) for p in result.problems] == [
        (3, "'not-an-email' is not an email address"),
        (4, "company_size 'lots' is not a whole number"),
    ]
    second = tmp_path / "more.jsonl"
    second.write_text('{"email": "ann@northwind.example", "last_name": "Lee", "region": "emea"}\n')
    result = import_file(engine=engine, path=second, kind="leads", now=T0)
    assert (result.created, result.updated) == (0, 1)
    with session_scope(engine) as session:
        ann = session.scalars(select(Lead).where(Lead.email == "ann@northwind.example")).one()
        assert (ann.first_name, ann.last_name, ann.company_size, ann.timezone) == ("Ann", "Lee", 200, "Europe/Berlin")
        assert ann.attributes == {"industry": "saas", "region": "emea"}


def test_events_are_deduplicated_and_create_unknown_leads(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "email,kind,occurred_at,external_id,properties\n"
        'new@lead.example,page_view,2026-03-01T10:00:00Z,e-1,"{""path"": ""/pricing""}"\n'
        "new@lead.example,page_view,2026-03-01T10:00:00Z,e-1,\n"
        "new@lead.example,page_view,yesterday,e-2,\n"
    )
    result = import_file(engine=engine, path=path, kind="events", now=T0)
    assert (result.rows_read, result.rows_kept, result.duplicates, result.leads_created) == (3, 1, 1, 1)
    assert result.problems[0].line == 4
    again = import_file(engine=engine, path=path, kind="events", now=T0)
    assert (again.rows_kept, again.duplicates, again.leads_created) == (0, 2, 0)


def test_status_and_explain_tell_the_story(engine: Engine, playbook: Playbook) -> None:
    world = World(engine, playbook)
    email = "ann@northwind.example"
    world.lead(email, at=T0, first_name="Ann", job_title="CTO", company_size=500)
    world.events(email, ("demo_request", T0), ("webinar_attended", T0), ("pricing_view", T0))
    world.lead("cold@lead.example", at=T0)
    world.advance(T0 + timedelta(minutes=5))
    world.dispatch(T0 + timedelta(minutes=5))
    with session_scope(engine) as session:
        totals = funnel(session=session)
        report = explain_lead(
            session=session, email=" ANN@northwind.example", playbook=playbook, now=T0 + timedelta(days=14, minutes=5)
        )
        assert explain_lead(session=session, email="nobody@x.example", playbook=playbook, now=T0) is None
    assert totals["leads_by_stage"] == {"cold": 1, "warm": 0, "hot": 1, "customer": 0}
    assert (totals["messages_by_status"]["sent"], totals["messages_by_status"]["queued"]) == (1, 0)
    assert totals["transitions"] == 1
    assert report is not None
    assert report["lead"]["stage"] == "hot"
    assert report["lead"]["score"] == pytest.approx(25 + 30 + 15 + 6, abs=0.1)
    assert report["score_breakdown"]["fit"] == {"decision maker": 15, "mid-market or larger": 10}
    assert report["score_breakdown"]["engagement_by_kind"]["demo_request"] == pytest.approx(15, abs=0.01)
    assert report["transitions"][0]["reason"].startswith("score 76.0 reached hot.enter_at 75")
    assert [(m["template"], m["status"], m["playbook_version"]) for m in report["messages"]] == [
        ("demo_offer", "sent", playbook.version)
    ]
    [enrollment] = report["enrollments"]
    assert (enrollment["steps_done"], enrollment["next_step"]) == (["demo_offer"], "sales_handoff")
    assert enrollment["next_due_at"] == (T0 + timedelta(days=2, minutes=5)).isoformat()
    assert report["enrollments"][0]["transition_id"] == report["transitions"][0]["id"]
    assert report["suppression"] is None


def test_an_empty_database_is_refused_with_the_command_to_run(tmp_path: Path) -> None:
    (tmp_path / "new.db").touch()
    engine = get_engine(f"sqlite:///{tmp_path / 'new.db'}")
    with pytest.raises(SchemaOutOfDateError, match="has no nurture tables yet: run `nurture db upgrade`"):
        ensure_current_schema(engine)


def test_a_mistyped_database_path_is_refused_and_nothing_is_created_there(tmp_path: Path) -> None:
    """Connecting would create an empty file (and its directory) that every later command
    reads as a database with no leads."""
    missing = tmp_path / "typo" / "nurture.db"
    engine = get_engine(f"sqlite:///{missing}")
    with pytest.raises(SchemaOutOfDateError, match=f"there is no database at {missing}: run `nurture db upgrade`"):
        ensure_current_schema(engine)
    assert not missing.parent.exists()


def test_a_value_the_database_refuses_is_a_row_problem_and_the_batch_is_kept(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the parser let through what a column cannot hold, the import still finishes:
    the row is reported with its line and the database's reason, its batch's good rows kept."""
    monkeypatch.setattr("nurture.importing.MAX_COMPANY_SIZE", 10**30)  # a parser that misses it
    path = tmp_path / "leads.csv"
    path.write_text(f"email,company_size\nann@x.example,5\nbob@x.example,{2**64}\ncara@x.example,7\n")
    result = import_file(engine=engine, path=path, kind="leads", now=T0)
    assert (result.rows_read, result.rows_kept, result.created) == (3, 2, 2)
    ((line, reason),) = [(p.line, p.reason) for p in result.problems]
    assert line == 3
    assert reason.startswith("the database refused it: ")
    assert str(2**64) not in reason  # the reason, not the statement with its values
    with session_scope(engine) as session:
        stored = {lead.email: lead.company_size for lead in session.scalars(select(Lead))}
    assert stored == {"ann@x.example": 5, "cara@x.example": 7}
