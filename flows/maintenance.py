"""Flows run by hand or at night: a full rescore after a playbook change, and bulk imports."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State

from db.cycle import record_scoring_version
from db.engine import session_scope
from db.imports import import_file
from flows.chunks import ARTIFACT_ROWS
from flows.cycle import publish_report, rescore_in_chunks, run_verdict
from flows.runtime import as_utc, current_runtime, run_name
from flows.sending import DispatchResult


@flow(name="rescore-all", flow_run_name=lambda: run_name("rescore-all"))
def rescore_all(
    now: datetime | None = None, batch_size: int = 2000, dry_run: bool = False, fan_out: bool = False
) -> dict[str, Any] | State[Any]:
    """Recompute every lead's score from all its events under the current playbook, in chunks.

    Run it after changing scoring rules or thresholds; stage changes it causes start their
    sequences as usual. Messages are sent by the next cycle or dispatch.

    Args:
        now: Score as of this time (default: now).
        batch_size: Leads per advance-leads chunk at least; more when that keeps the chunks to 50.
        dry_run: Compute everything and report what would change, then roll it back.
        fan_out: Advance the chunks as runs of the advance-chunk deployment, shared by every worker
            of the pool (off: as tasks of this run, NURTURE_CHUNK_CONCURRENCY at a time).

    The run ends Failed when a chunk failed (rolled back); the rules are then not recorded as
    current, so `nurture status` and the cycles keep saying a rescore-all is needed.
    """
    at = as_utc(now)
    runtime = current_runtime()
    chunks = rescore_in_chunks(at, batch_size, dry_run=dry_run, fan_out=fan_out)
    advanced = chunks.result
    publish_report(advanced, DispatchResult(), at=at, dry_run=dry_run)
    if not dry_run and not chunks.failed:
        with session_scope(runtime.engine) as session:
            record_scoring_version(
                session=session, version=runtime.playbook.scoring_version, now=at, set_by="rescore-all"
            )
    get_run_logger().info(
        "%s %d leads in %d chunks under playbook %s: %d scores changed, %d transitions",
        "would rescore" if dry_run else "rescored",
        advanced.leads,
        chunks.chunks,
        runtime.playbook.version,
        advanced.score_changes,
        sum(advanced.transitions.values()),
    )
    summary = {
        "dry_run": dry_run,
        "leads": advanced.leads,
        "chunks": chunks.chunks,
        "chunks_failed": chunks.failed,
        "score_changes": advanced.score_changes,
        "transitions": dict(advanced.transitions),
    }
    return run_verdict(DispatchResult(), summary, failed_chunks=chunks.failed)


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
