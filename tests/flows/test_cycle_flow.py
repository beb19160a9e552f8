"""The nurture-cycle flow under a real (test) Prefect server: runs, names, results, artifacts."""

from __future__ import annotations

from datetime import timedelta

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
)

from db.engine import get_engine, session_scope, upgrade_schema
from db.imports import add_events, upsert_leads
from flows.cycle import nurture_cycle
from nurture.population import generate_population
from tests.conftest import T0


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
        # The first run had 60 leads in chunks of 25; the second had nothing to do.
        assert {"advance-leads-1/3", "advance-leads-2/3", "advance-leads-3/3", "advance-leads-1/1"} <= task_names
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["nurture-cycle-transitions", "nurture-cycle-messages", "nurture-funnel"])
            )
        )
        assert {a.key for a in artifacts} == {"nurture-cycle-transitions", "nurture-cycle-messages", "nurture-funnel"}
