"""The nurture-cycle flow under a real (test) Prefect server: runs, names, results, artifacts."""

from __future__ import annotations

import json
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
)
from sqlalchemy import select
from sqlmodel import col

from db.engine import get_engine, session_scope, upgrade_schema
from db.imports import add_events, upsert_leads
from db.models import Message
from flows.cycle import nurture_cycle
from flows.runtime import reset_runtime
from nurture.importing import EventRecord, LeadRecord
from nurture.population import generate_population
from tests.conftest import T0, TEMPLATES_DIR


def test_the_cycle_flow_advances_leads_sends_and_publishes_artifacts(
    prefect_api: str, nurture_env: dict[str, str]
) -> None:
    engine = get_engine(nurture_env["NURTURE_DATABASE_URL"])
    upgrade_schema(engine)
    population = generate_population(leads=60, start=T0, end=T0 + timedelta(days=10), seed=5)
    with session_scope(engine) as session:
        upsert_leads(session=session, records=population.leads, now=T0)
        add_events(session=session, records=population.events, now=T0)

    now = T0 + timedelta(days=10)
    rehearsal = nurture_cycle(now=now, batch_size=25, dry_run=True)
    assert rehearsal["dry_run"]
    assert sum(rehearsal["transitions"].values()) > 0
    assert rehearsal["messages"] == {}
    summary = nurture_cycle(now=now, batch_size=25)
    assert summary["transitions"] == rehearsal["transitions"]  # the dry run wrote nothing
    assert summary["leads_advanced"] == 60
    assert sum(summary["transitions"].values()) > 0
    assert summary["messages_queued"] > 0
    assert summary["messages"].get("sent", 0) > 0
    assert sum(summary["funnel"]["leads_by_stage"].values()) == 60

    again = nurture_cycle(now=now, batch_size=25)
    assert again["leads_advanced"] == 0
    assert again["transitions"] == {}
    assert again["messages"] == {}

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"cycle-{now:%Y-%m-%dT%H:%MZ}"]))
        )
        assert len(runs) == 3
        assert all(run.state is not None and run.state.is_completed() for run in runs)
        ids = FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in runs]))
        task_names = {t.name for t in client.read_task_runs(flow_run_filter=ids)}
        # The dry run and the first run had 60 leads in 3 ranges of 25 at most; the last had nothing to do.
        assert {n for n in task_names if n.startswith("advance-leads")} == {
            "advance-leads-1/3",
            "advance-leads-2/3",
            "advance-leads-3/3",
        }
        keys = ["nurture-cycle-transitions", "nurture-cycle-messages", "nurture-funnel", "nurture-sequence-report"]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
        assert {a.key for a in artifacts} == set(keys)
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["nurture-sequence-report"]))
        )
    # The last run's report counts every email the cycles sent, per step (a split step: all, then each variant).
    rows = json.loads(latest[0].data) if isinstance(latest[0].data, str) else latest[0].data
    steps = [row for row in rows if row["variant"] in ("", "(all)")]
    assert sum(row["sent"] for row in steps) == summary["messages"]["sent"]
    assert {row["sequence"] for row in steps} <= set(summary_sequences(engine))


def test_a_cycle_that_failed_messages_is_a_failed_run_and_raises_an_event(
    prefect_api: str, nurture_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    for name in ("welcome.html", "demo_offer.html"):
        (templates / name).write_text('{% extends "_layout.html" %}{% block body %}{{ lead.nickname }}{% endblock %}')
    monkeypatch.setenv("NURTURE_TEMPLATES", str(templates))
    reset_runtime()
    engine = get_engine(nurture_env["NURTURE_DATABASE_URL"])
    upgrade_schema(engine)
    with session_scope(engine) as session:
        upsert_leads(
            session=session,
            records=[LeadRecord(1, "ann@northwind.example", {"job_title": "CTO", "company_size": 500}, {})],
            now=T0,
        )
        add_events(
            session=session,
            records=[EventRecord(1, "ann@northwind.example", k, T0) for k in ("demo_request", "webinar_attended")],
            now=T0,
        )
    now = T0 + timedelta(minutes=10)
    state = nurture_cycle(now=now, return_state=True)
    assert state.is_failed()
    assert state.message is not None
    assert state.message.startswith("1 messages failed, 0 in doubt")
    summary = state.result(raise_on_failure=False)
    assert summary["messages"] == {"failed": 1}
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        assert run.state is not None
        assert run.state.type.value == "FAILED"
    deadline = time.monotonic() + 30
    found: list[object] = []
    while not found and time.monotonic() < deadline:
        answer = httpx.post(
            f"{prefect_api}/events/filter",
            json={
                "filter": {
                    "event": {"name": ["nurture.delivery.problems"]},
                    "occurred": {"since": "2020-01-01T00:00:00Z"},
                }
            },
            timeout=10,
        )
        found = [e for e in answer.json().get("events", []) if e["payload"].get("failed") == 1]
        time.sleep(0.5)
    assert found, "no nurture.delivery.problems event reached the Prefect server"


def summary_sequences(engine: Any) -> list[str]:
    with session_scope(engine) as session:
        return list(session.scalars(select(col(Message.sequence)).distinct()))
