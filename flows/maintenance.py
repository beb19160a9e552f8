"""Flows run by hand or at night: a full rescore after a playbook change, and bulk imports."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from sqlalchemy import func, select
from sqlmodel import col

from db.cycle import record_scoring_version
from db.engine import session_scope
from db.imports import import_file
from db.models import Lead
from flows.advancing import replay_chunk_size
from flows.cycle import ARTIFACT_ROWS, advance_all, as_utc, publish_report, run_name
from flows.runtime import current_runtime
from flows.sending import DispatchResult


@flow(name="rescore-all", flow_run_name=lambda: run_name("rescore-all"))
def rescore_all(now: datetime | None = None, batch_size: int = 2000, dry_run: bool = False) -> dict[str, Any]:
    """Recompute every lead's score from all its events under the current playbook, in chunks.

    Run it after changing scoring rules or thresholds; stage changes it causes start their
    sequences as usual. Messages are sent by the next cycle or dispatch.

    Args:
        now: Score as of this time (default: now).
        batch_size: Leads per advance-leads task at least; more when that keeps the task runs to 50.
        dry_run: Compute everything and report what would change, then roll it back.
    """
    at = as_utc(now)
    runtime = current_runtime()
    with session_scope(runtime.engine) as session:
        total = int(session.scalar(select(func.count(col(Lead.id)))) or 0)
    advanced = advance_all(at, replay_chunk_size(total, batch_size), total, replay=True, dry_run=dry_run)
    publish_report(advanced, DispatchResult(), dry_run=dry_run)
    if not dry_run:
        with session_scope(runtime.engine) as session:
            record_scoring_version(
                session=session, version=runtime.playbook.scoring_version, now=at, set_by="rescore-all"
            )
    get_run_logger().info(
        "%s %d leads under playbook %s: %d scores changed, %d transitions",
        "would rescore" if dry_run else "rescored",
        advanced.leads,
        runtime.playbook.version,
        advanced.score_changes,
        sum(advanced.transitions.values()),
    )
    return {
        "dry_run": dry_run,
        "leads": advanced.leads,
        "score_changes": advanced.score_changes,
        "transitions": dict(advanced.transitions),
    }


@task(name="import-file", cache_policy=NO_CACHE, retries=0)
def import_task(path: str, kind: Literal["leads", "events"]) -> dict[str, Any]:
    """Load one file; each batch of rows commits on its own, bad rows are reported with their line."""
    result = import_file(engine=current_runtime().engine, path=Path(path), kind=kind, now=datetime.now(UTC))
    logger = get_run_logger()
    for problem in result.problems[:50]:
        logger.warning("%s:%d: %s", path, problem.line, problem.reason)
    create_table_artifact(
        key=f"nurture-import-{kind}",
        table=[{"line": p.line, "problem": p.reason} for p in result.problems[:ARTIFACT_ROWS]]
        or [{"line": "", "problem": "(none)"}],
        description=f"{path}: {result.rows_read} rows read, {result.rows_kept} kept, "
        f"{len(result.problems)} bad rows skipped",
    )
    return {
        "rows_read": result.rows_read,
        "rows_kept": result.rows_kept,
        "created": result.created,
        "updated": result.updated,
        "duplicates": result.duplicates,
        "bad_rows": len(result.problems),
    }


@flow(name="import-leads", flow_run_name="import-leads")
def import_leads(path: str) -> dict[str, Any]:
    """Create or update leads from a CSV or JSON Lines file on the worker's disk.

    Args:
        path: The file to load, relative to the project root or absolute.
    """
    return import_task(path, "leads")


@flow(name="import-events", flow_run_name="import-events")
def import_events(path: str) -> dict[str, Any]:
    """Add behavioural events from a CSV or JSON Lines file on the worker's disk.

    Args:
        path: The file to load, relative to the project root or absolute.
    """
    return import_task(path, "events")
