"""The nurture cycle: score changed leads → transitions → enrollments → dispatch due messages.

A handful of batch tasks per run, whatever the number of leads: one per chunk
of leads to advance, one to dispatch, one to publish the report. The rules live
in the core; this module only orders the steps.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from db.cycle import ChunkResult, advance_leads, count_leads_to_advance, next_lead_ids
from db.dispatch import DispatchResult, dispatch_due
from db.engine import session_scope
from db.reports import funnel
from flows.pacing import send_pacer
from flows.runtime import current_runtime


def _cycle_run_name() -> str:
    now = flow_run.parameters.get("now")
    when = now if isinstance(now, datetime) else datetime.now(UTC)
    return f"cycle-{when.astimezone(UTC):%Y-%m-%dT%H:%MZ}"


def _now(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@task(name="advance-leads", task_run_name="advance-leads-{chunk}/{chunks}", cache_policy=NO_CACHE)
def advance_leads_task(now: datetime, after_id: int, batch_size: int, chunk: int, chunks: int) -> ChunkResult:
    """Score one chunk of leads, apply their transitions and enrollments in one transaction."""
    runtime = current_runtime()
    run_id = str(flow_run.id) if flow_run.id else None
    with session_scope(runtime.engine) as session:
        lead_ids = next_lead_ids(session=session, now=now, after_id=after_id, limit=batch_size)
        return advance_leads(session=session, lead_ids=lead_ids, playbook=runtime.playbook, now=now, flow_run_id=run_id)


@task(name="dispatch-due-messages", cache_policy=NO_CACHE)
def dispatch_task(now: datetime, batch_size: int) -> DispatchResult:
    """Send every message due by ``now`` (suppressed addresses are skipped and recorded)."""
    runtime = current_runtime()
    logger = get_run_logger()
    settings = runtime.settings
    result = dispatch_due(
        engine=runtime.engine,
        playbook=runtime.playbook,
        renderer=runtime.renderer,
        transport=runtime.transport,
        sender=runtime.sender,
        now=now,
        batch_size=batch_size,
        concurrency=settings.nurture_send_concurrency,
        pace=send_pacer(settings.nurture_send_rate),
    )
    if result.settled:
        logger.warning("%d sends were never confirmed by the provider and are now failed (not resent)", result.settled)
    for failure in result.failures[:20]:
        logger.warning("message %(message_id)s to lead %(lead_id)s (%(template)s) %(status)s: %(reason)s", failure)
    return result


def publish_report(advanced: ChunkResult, dispatched: DispatchResult) -> dict[str, Any]:
    """Table artifacts with stable keys: transitions by path, messages by status, the funnel."""
    with session_scope(current_runtime().engine) as session:
        totals = funnel(session=session)
    create_table_artifact(
        key="nurture-cycle-transitions",
        table=[{"from → to": path, "leads": n} for path, n in sorted(advanced.transitions.items())]
        or [{"from → to": "(none)", "leads": 0}],
        description="Stage transitions applied by this cycle",
    )
    create_table_artifact(
        key="nurture-cycle-messages",
        table=[{"status": status, "messages": n} for status, n in sorted(dispatched.by_status.items())]
        or [{"status": "(nothing due)", "messages": 0}],
        description="Messages this cycle tried to send, by outcome",
    )
    create_table_artifact(
        key="nurture-funnel",
        table=[{"stage": stage, "leads": n} for stage, n in totals["leads_by_stage"].items()],
        description="Leads per stage after this cycle",
    )
    return totals


@flow(name="nurture-cycle", flow_run_name=_cycle_run_name, log_prints=False)
def nurture_cycle(now: datetime | None = None, batch_size: int = 2000, dispatch: bool = True) -> dict[str, Any]:
    """Rescore leads that changed, move them between stages, enroll them, send what is due.

    ``now`` defaults to the current time; pass a time to replay or simulate.
    """
    logger = get_run_logger()
    at = _now(now)
    with session_scope(current_runtime().engine) as session:
        to_advance = count_leads_to_advance(session=session, now=at)
    chunks = max(math.ceil(to_advance / batch_size), 1)
    advanced = ChunkResult()
    chunk, after_id = 0, 0
    while True:
        chunk += 1
        result = advance_leads_task(at, after_id, batch_size, chunk, max(chunks, chunk))
        advanced.add(result)
        if result.leads < batch_size:
            break
        after_id = result.last_lead_id
    dispatched = dispatch_task(at, batch_size) if dispatch else DispatchResult()
    totals = publish_report(advanced, dispatched)
    logger.info(
        "cycle at %s: %d leads rescored, %d transitions, %d messages queued, %d sent, %d failed",
        at.isoformat(),
        advanced.leads,
        sum(advanced.transitions.values()),
        advanced.messages_queued,
        dispatched.by_status.get("sent", 0),
        dispatched.by_status.get("failed", 0),
    )
    return {
        "now": at.isoformat(),
        "leads_advanced": advanced.leads,
        "score_changes": advanced.score_changes,
        "transitions": dict(advanced.transitions),
        "enrollments": advanced.enrollments,
        "messages_queued": advanced.messages_queued,
        "messages_cancelled": advanced.messages_cancelled,
        "messages": dict(dispatched.by_status),
        "funnel": totals,
    }


def _dispatch_run_name() -> str:
    now = flow_run.parameters.get("now")
    when = now if isinstance(now, datetime) else datetime.now(UTC)
    return f"dispatch-{when.astimezone(UTC):%Y-%m-%dT%H:%MZ}"


@flow(name="dispatch", flow_run_name=_dispatch_run_name)
def dispatch_messages(now: datetime | None = None, batch_size: int = 500) -> dict[str, int]:
    """Send the messages that are due, between cycles; several may run at once.

    Claims are exclusive (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and the send
    rate is shared through the ``nurture-send`` limit, so extra dispatchers add
    throughput, never duplicates.
    """
    result = dispatch_task(_now(now), batch_size)
    create_table_artifact(
        key="nurture-dispatch-messages",
        table=[{"status": status, "messages": n} for status, n in sorted(result.by_status.items())]
        or [{"status": "(nothing due)", "messages": 0}],
        description="Messages this dispatch tried to send, by outcome",
    )
    return dict(result.by_status)
