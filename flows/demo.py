"""The demo: a generated population run through the real nurture cycle over simulated weeks.

It uses the configured database and outbox (by default ``./nurture.db`` and
``./outbox``), so ``nurture status`` and ``nurture explain`` afterwards show what
happened. Every tick is a real ``nurture-cycle`` flow run with ``now`` set to
the simulated time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from db.cycle import batched
from db.engine import get_engine, session_scope, upgrade_schema
from db.imports import add_events, upsert_leads
from db.inbound import ingest_provider_events
from db.maintenance import delete_everything, row_counts
from db.reports import emails_sent_between, emails_sent_twice, funnel, reacting_lead, story_lead
from nurture.errors import NurtureError
from nurture.inbound import parse_sendgrid_batch
from nurture.playbook import load_playbook
from nurture.population import engagement_events, generate_population
from nurture.settings import Settings


@dataclass(frozen=True)
class DemoResult:
    totals: dict[str, Any]
    example_email: str | None
    # Per sequence, leads sent one of its emails twice (reentry: always allows it).
    sent_twice: dict[str, int]
    seconds: float
    # How the sequences reacted to the leads: opens, clicks, conversions, skips, branches, variants.
    reactions: dict[str, Any]
    # A lead whose sequence reacted (a branch, a conversion), for `nurture explain`.
    reacting_email: str | None = None


def _clear_outbox(outbox: Path) -> int:
    removed = 0
    if outbox.is_dir():
        for eml in outbox.glob("*.eml"):
            eml.unlink()
            removed += 1
    return removed


def run_demo(
    *, settings: Settings, leads: int, weeks: int, tick: timedelta, seed: int, reset: bool, console: Console
) -> DemoResult:
    """Set up, generate and simulate, showing progress; returns the final funnel."""
    started = time.monotonic()
    load_playbook(settings.nurture_playbook, templates_dir=settings.nurture_templates)  # fail before any work
    engine = get_engine(settings.database_url)
    upgrade_schema(engine)
    with session_scope(engine) as session:
        existing = row_counts(session=session)
    if any(existing.values()):
        if not reset:
            raise NurtureError(
                f"the database already holds {existing['lead']} leads; run `nurture demo --reset` to replace them"
            )
        with session_scope(engine) as session:
            delete_everything(session=session)
        removed = _clear_outbox(settings.nurture_outbox_dir)
        console.print(
            f"Starting clean: removed {existing['lead']} leads, {existing['event']} events and "
            f"{existing['message']} messages from the previous run, and {removed} emails from "
            f"{settings.nurture_outbox_dir}/"
        )
    else:
        _clear_outbox(settings.nurture_outbox_dir)

    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(weeks=weeks)
    population = generate_population(leads=leads, start=start, end=end, seed=seed)
    with session_scope(engine) as session:
        upsert_leads(session=session, records=population.leads, now=start)
    with session_scope(engine) as session:
        for batch in batched(population.events, 5000):
            add_events(session=session, records=batch, now=start, source="demo")
    console.print(
        f"Generated {len(population.leads)} leads with {len(population.events)} events over {weeks} simulated "
        f"weeks ({start:%Y-%m-%d} → {end:%Y-%m-%d}); running a cycle every {tick.total_seconds() / 3600:g} hours."
    )

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.cycle import nurture_cycle, run_and_report

    ticks = []
    at = start + tick
    while at <= end:
        ticks.append(at)
        at += tick
    sent = transitions = 0
    reactions: dict[str, Any] = {
        "opens": 0,
        "machine_opens": 0,
        "clicks": 0,
        "converted": 0,
        "steps_skipped": 0,
        "branches": {},
        "variants": {},
    }
    # The leads' opens and clicks, reported (as SendGrid's webhook would) once their time has come.
    pending: list[dict[str, Any]] = []
    last = start
    with (
        Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        # Heartbeats detect crashed runs of long flows; each costs a second at the end of a
        # run, which would double the demo's time for runs that last well under a second.
        bar = progress.add_task("simulating", total=len(ticks), detail="")
        for now in ticks:
            pending = _report_engagement(engine, pending, now, reactions)
            summary, _ = run_and_report(nurture_cycle, now=now)
            transitions += sum(summary["transitions"].values())
            sent += summary["messages"].get("sent", 0)
            reactions["converted"] += summary["enrollments_converted"]
            reactions["steps_skipped"] += summary["steps_skipped"]
            for key in ("branches", "variants"):
                for name, n in summary[f"{key}_taken" if key == "branches" else "variants_queued"].items():
                    reactions[key][name] = reactions[key].get(name, 0) + n
            with session_scope(engine) as session:
                delivered = emails_sent_between(session=session, start=last, end=now)
            pending.extend(engagement_events(delivered, personas=population.personas, seed=seed))
            last = now
            progress.update(
                bar,
                advance=1,
                description=f"{now:%Y-%m-%d %H:%M}",
                detail=f"{transitions} transitions, {sent} emails sent",
            )

    with session_scope(engine) as session:
        totals = funnel(session=session)
        example = story_lead(session=session)
        twice = emails_sent_twice(session=session)
        reacting = reacting_lead(session=session)
    return DemoResult(
        totals=totals,
        example_email=example,
        sent_twice=twice,
        seconds=time.monotonic() - started,
        reactions=reactions,
        reacting_email=reacting,
    )


def _report_engagement(
    engine: Any, pending: list[dict[str, Any]], now: datetime, reactions: dict[str, Any]
) -> list[dict[str, Any]]:
    """Post the opens and clicks that have happened by ``now`` through the webhook's own parsing and
    ingestion; returns those still to come."""
    due = [e for e in pending if e["timestamp"] <= now.timestamp()]
    if due:
        batch = parse_sendgrid_batch(due)
        with session_scope(engine) as session:
            ingest_provider_events(session=session, events=batch.events, now=now)
        reactions["machine_opens"] += sum(1 for e in due if e.get("sg_machine_open"))
        reactions["opens"] += sum(1 for e in due if e["event"] == "open" and not e.get("sg_machine_open"))
        reactions["clicks"] += sum(1 for e in due if e["event"] == "click")
    return [e for e in pending if e["timestamp"] > now.timestamp()]
