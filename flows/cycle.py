"""The nurture cycle: score changed leads → transitions → enrollments → next steps → dispatch due messages.

A handful of batch tasks per run, whatever the number of leads: one per chunk
of leads to advance, one per chunk of enrollments whose next step is due, one
to dispatch. The rules live in the core; this module
only orders the steps and reports them (artifacts, events, logs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.states import Failed
from sqlalchemy import func, select
from sqlmodel import col

from db.cycle import ChunkResult, record_scoring_version, scoring_version_in_use
from db.engine import session_scope
from db.models import Lead
from db.reports import STAGE_ORDER, funnel
from flows.advancing import WalkResult, replay_chunk_size, walk_sequences
from flows.chunks import ARTIFACT_ROWS, Advanced, advance_in_chunks
from flows.pacing import send_pacer
from flows.reporting import publish_sequence_report
from flows.runtime import as_utc, current_runtime, run_name
from flows.sending import DispatchResult, dispatch_due
from flows.webhooks import HttpPoster, WebhookResult, deliver_webhooks


# Safe to retry: a failed chunk rolled back, and a committed one left no enrollment due.
@task(
    name="walk-sequences",
    task_run_name="walk-sequences-{chunk}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=10,
)
def walk_sequences_task(now: datetime, batch_size: int, chunk: int, dry_run: bool = False) -> WalkResult:
    """Decide the next step of a chunk of enrollments that are due, and queue it (one transaction)."""
    runtime = current_runtime()
    with session_scope(runtime.engine, commit=not dry_run) as session:
        return walk_sequences(session=session, playbook=runtime.playbook, now=now, limit=batch_size)


def walk_all(at: datetime, batch_size: int, *, dry_run: bool = False) -> WalkResult:
    """Walk every enrollment that is due, a chunk per task, once each in this cycle.

    A dry run rolls each chunk back, so it walks the first chunk only (the next would find the same).
    """
    walked = WalkResult()
    chunk = 0
    while True:
        chunk += 1
        result = walk_sequences_task(at, batch_size, chunk, dry_run)
        walked.add(result)
        if result.enrollments < batch_size or dry_run:
            return walked


# Safe to retry: only `queued` messages are claimed, so nothing sent or in doubt is sent again.
@task(name="dispatch-due-messages", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=30)
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
        clock=lambda: datetime.now(UTC),
        batch_size=batch_size,
        concurrency=settings.nurture_send_concurrency,
        pace=send_pacer(settings.nurture_send_rate),
        lease=timedelta(seconds=settings.nurture_send_lease_seconds),
    )
    if result.found_in_doubt:
        logger.warning(
            "%d sends of a stopped dispatcher are in doubt (not resent): `nurture messages list --status in_doubt`",
            result.found_in_doubt,
        )
    for problem in result.problems[:20]:
        logger.warning(
            "message %s to lead %s (%s) %s: %s",
            problem.message_id,
            problem.lead_id,
            problem.step_id,
            problem.status,
            problem.reason,
        )
    return result


# Safe to retry: only due queued or failed deliveries are claimed; one in doubt is never sent again.
@task(name="deliver-webhooks", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=30)
def webhooks_task(now: datetime, batch_size: int) -> WebhookResult:
    """Deliver the outbound webhooks due by ``now``, signed (docs/webhooks.md)."""
    runtime = current_runtime()
    poster = HttpPoster()
    try:
        result = deliver_webhooks(
            engine=runtime.engine,
            secrets=runtime.webhook_secrets,
            now=now,
            clock=lambda: datetime.now(UTC),
            poster=poster,
            batch_size=batch_size,
            lease=timedelta(seconds=runtime.settings.nurture_send_lease_seconds),
        )
    finally:
        poster.close()
    if result.found_in_doubt:
        get_run_logger().warning(
            "%d webhook deliveries of a stopped dispatcher are in doubt (not resent): "
            "`nurture messages list --webhooks`",
            result.found_in_doubt,
        )
    for problem in result.problems[:20]:
        get_run_logger().warning("%s", problem)
    return result


def deliver_if_configured(at: datetime, batch_size: int) -> WebhookResult | None:
    """The webhooks task, when the playbook has webhooks (a task run costs 30–80 ms: none for nothing)."""
    return webhooks_task(at, batch_size) if current_runtime().playbook.webhooks else None


def run_verdict(
    dispatched: DispatchResult,
    summary: dict[str, Any],
    *,
    failed_chunks: Sequence[str] = (),
    webhooks: WebhookResult | None = None,
) -> dict[str, Any] | State[Any]:
    """The run's end: its summary, or a Failed state carrying it when chunks of leads failed or
    messages failed or are in doubt.

    An operator must see such a run in the runs list, not a green "Completed"; the
    ``nurture.delivery.problems`` event lets an Automation alert on delivery problems.
    A failed chunk rolled back: the next cycle advances its leads.
    """
    problems = []
    if failed_chunks:
        problems.append(
            f"{len(failed_chunks)} chunks of leads failed and were rolled back ({', '.join(failed_chunks)}): "
            "the other chunks are kept and the next cycle advances their leads"
        )
    if dispatched.failed or dispatched.in_doubt:
        problems.append(
            f"{dispatched.failed} messages failed, {dispatched.in_doubt} in doubt: "
            "see the messages artifact, `nurture messages list` and `nurture messages retry`"
        )
        emit_event(
            event="nurture.delivery.problems",
            resource={"prefect.resource.id": f"nurture.flow-run.{flow_run.id or 'local'}"},
            payload={"failed": dispatched.failed, "in_doubt": dispatched.in_doubt},
        )
    if webhooks is not None and (webhooks.dead or webhooks.in_doubt):
        problems.append(
            f"{webhooks.dead} webhook deliveries dead, {webhooks.in_doubt} in doubt: "
            "`nurture messages list --webhooks` and `nurture messages retry --webhooks`"
        )
    if not problems:
        return summary
    message = "; ".join(problems)
    get_run_logger().error(message)
    return Failed(message=message, data=summary)


def run_and_report(run: Any, **parameters: Any) -> tuple[dict[str, Any], bool]:
    """Call a flow and return (its summary, whether it ended well), without raising on a Failed state."""
    state = run(**parameters, return_state=True)
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, BaseException):
        raise summary
    return summary, not state.is_failed()


def publish_report(
    advanced: ChunkResult, dispatched: DispatchResult, *, at: datetime, dry_run: bool = False
) -> dict[str, Any]:
    """Table artifacts with stable keys: transitions, the funnel and its change, messages, the sequence report."""
    label = "DRY RUN, nothing was written: " if dry_run else ""
    with session_scope(current_runtime().engine) as session:
        totals = funnel(session=session)
    change: Counter[str] = Counter()
    for path, n in advanced.transitions.items():
        from_stage, to_stage = path.split("→")
        change[from_stage] -= n
        change[to_stage] += n
    create_table_artifact(
        key="nurture-cycle-transitions",
        table=[
            {"lead": m.lead_id, "from": m.from_stage.value, "to": m.to_stage.value, "score": round(m.score, 1)}
            for m in advanced.moved[:ARTIFACT_ROWS]
        ]
        or [{"lead": "(none)", "from": "", "to": "", "score": ""}],
        description=f"{label}Stage transitions of this run: "
        + (", ".join(f"{path} {n}" for path, n in sorted(advanced.transitions.items())) or "none"),
    )
    create_table_artifact(
        key="nurture-funnel",
        table=[
            {"stage": stage, "leads": totals["leads_by_stage"][stage], "change this run": change.get(stage, 0)}
            for stage in STAGE_ORDER
        ],
        description="Leads per stage after this run, and how this run changed them",
    )
    publish_messages(dispatched, key="nurture-cycle-messages")
    publish_sequence_report(at)
    return totals


def publish_messages(dispatched: DispatchResult, *, key: str) -> None:
    create_table_artifact(
        key=key,
        table=[
            {"status": status, "messages": n, "message": "", "reason": ""}
            for status, n in sorted(dispatched.by_status.items())
        ]
        + (
            [
                {
                    "status": "in_doubt (left by a stopped dispatcher)",
                    "messages": dispatched.found_in_doubt,
                    "message": "",
                    "reason": "not resent: SendGrid's events settle them, or `nurture messages retry`",
                }
            ]
            if dispatched.found_in_doubt
            else []
        )
        + [
            {"status": p.status, "messages": 1, "message": p.message_id, "reason": p.reason}
            for p in dispatched.problems[:ARTIFACT_ROWS]
        ]
        or [{"status": "(nothing due)", "messages": 0, "message": "", "reason": ""}],
        description="Messages this run tried to send: totals by outcome, then each failed, suppressed or in-doubt one",
    )


@flow(name="nurture-cycle", flow_run_name=lambda: run_name("cycle"), log_prints=False)
def nurture_cycle(
    now: datetime | None = None,
    batch_size: int = 2000,
    dispatch: bool = True,
    dry_run: bool = False,
    fan_out: bool = False,
) -> dict[str, Any] | State[Any]:
    """Rescore leads that changed, move them between stages, enroll them, take due steps, send what is due.

    Args:
        now: Run as of this time (default: now); pass a time to replay or simulate.
        batch_size: Leads per advance-leads chunk and messages per dispatch claim.
        dispatch: Send due messages at the end (off to only score and enroll).
        dry_run: Compute everything and report what would happen, then roll it back; send nothing.
        fan_out: Advance the chunks as runs of the advance-chunk deployment, shared by every worker
            of the pool (off: as tasks of this run, NURTURE_CHUNK_CONCURRENCY at a time).

    The run ends Failed (with its summary) when a chunk of leads failed, or messages failed or are in doubt.
    """
    logger = get_run_logger()
    at = as_utc(now)
    rescore = check_scoring_version(at, batch_size, dry_run=dry_run, fan_out=fan_out)
    chunks = advance_in_chunks(at, batch_size, dry_run=dry_run, fan_out=fan_out)
    advanced = chunks.result
    if rescore.rescored is not None:
        advanced.add(rescore.rescored.result)
    failed_chunks = [*(rescore.rescored.failed if rescore.rescored else []), *chunks.failed]
    walked = walk_all(at, batch_size, dry_run=dry_run)
    dispatched = dispatch_task(at, batch_size) if dispatch and not dry_run else DispatchResult()
    webhooks = deliver_if_configured(at, batch_size) if dispatch and not dry_run else None
    totals = publish_report(advanced, dispatched, at=at, dry_run=dry_run)
    logger.info(
        "cycle at %s: %d leads rescored in %d chunks, %d transitions, %d messages queued, %d sent, %d failed",
        at.isoformat(),
        advanced.leads,
        chunks.chunks,
        sum(advanced.transitions.values()),
        walked.messages_queued,
        dispatched.by_status.get("sent", 0),
        dispatched.by_status.get("failed", 0),
    )
    summary = {
        "now": at.isoformat(),
        "dry_run": dry_run,
        "leads_advanced": advanced.leads,
        "chunks": chunks.chunks,
        "chunks_failed": failed_chunks,
        "score_changes": advanced.score_changes,
        "transitions": dict(advanced.transitions),
        "enrollments": advanced.enrollments,
        "enrollments_not_reentered": advanced.enrollments_skipped,
        "enrollments_converted": advanced.conversions,
        "enrollments_ended": walked.ended,
        "messages_queued": walked.messages_queued,
        "steps_skipped": walked.steps_skipped,
        "branches_taken": walked.branches,
        "variants_queued": walked.variants,
        "messages_cancelled": advanced.messages_cancelled,
        "messages": {str(k): v for k, v in dispatched.by_status.items()},
        "messages_in_doubt_from_stopped_dispatchers": dispatched.found_in_doubt,
        "claims_released_from_stopped_dispatchers": dispatched.released,
        "funnel": totals,
        "rescore_needed": rescore.needed,
        "rescored_all_leads": rescore.rescored is not None and not rescore.rescored.failed,
    }
    if webhooks is not None:
        summary["webhooks"] = webhooks.as_json()
    return run_verdict(dispatched, summary, failed_chunks=failed_chunks, webhooks=webhooks)


@dataclass(frozen=True)
class ScoringCheck:
    """Whether stored scores follow the playbook's scoring rules: ``needed`` when they do not (and
    nothing rescored them); ``rescored`` when this cycle rescored every lead first."""

    needed: bool
    rescored: Advanced | None = None


def check_scoring_version(at: datetime, batch_size: int, *, dry_run: bool, fan_out: bool = False) -> ScoringCheck:
    """Compare the scoring rules of the stored scores with the playbook's; rescore every lead first
    when they changed and NURTURE_RESCORE_ON_SCORING_CHANGE is on, else say a rescore-all is needed.

    The new rules are recorded as current only when every chunk of the rescore committed."""
    runtime = current_runtime()
    version = runtime.playbook.scoring_version
    with session_scope(runtime.engine, commit=not dry_run) as session:
        in_use = scoring_version_in_use(session=session)
        if in_use is None:  # a new database, or one from before this was recorded: its scores are taken as current
            record_scoring_version(session=session, version=version, now=at, set_by="first cycle", only_if_unset=True)
    if in_use is None or in_use == version:
        return ScoringCheck(needed=False)
    if not runtime.settings.nurture_rescore_on_scoring_change or dry_run:
        get_run_logger().warning(
            "the playbook's scoring rules or stage thresholds changed since scores were last computed "
            "(scoring version %s, now %s): stored scores and stages follow the old rules until "
            "`nurture run rescore-all` (or set NURTURE_RESCORE_ON_SCORING_CHANGE=true)",
            in_use,
            version,
        )
        return ScoringCheck(needed=True)
    get_run_logger().info("scoring rules changed (%s → %s): rescoring every lead first", in_use, version)
    rescored = rescore_in_chunks(at, batch_size, fan_out=fan_out)
    if rescored.failed:
        return ScoringCheck(needed=True, rescored=rescored)
    with session_scope(runtime.engine) as session:
        record_scoring_version(session=session, version=version, now=at, set_by="rescore-all")
    return ScoringCheck(needed=False, rescored=rescored)


def rescore_in_chunks(at: datetime, batch_size: int, *, dry_run: bool = False, fan_out: bool = False) -> Advanced:
    """Recompute every lead's score from its events, in at most ``REPLAY_TASK_RUNS`` chunks below 1.25M leads."""
    with session_scope(current_runtime().engine) as session:
        total = int(session.scalar(select(func.count(col(Lead.id)))) or 0)
    return advance_in_chunks(at, replay_chunk_size(total, batch_size), replay=True, dry_run=dry_run, fan_out=fan_out)


@flow(name="dispatch", flow_run_name=lambda: run_name("dispatch"))
def dispatch_messages(now: datetime | None = None, batch_size: int = 500) -> dict[str, Any] | State[Any]:
    """Send the messages and deliver the webhooks that are due, between cycles; several may run at once.

    Claims are exclusive (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and the send
    rate is shared through the ``nurture-send`` limit, so extra dispatchers add
    throughput, never duplicates.

    Args:
        now: Send what is due by this time (default: now).
        batch_size: Messages claimed at a time.

    The run ends Failed (with its summary) when messages failed or are in doubt.
    """
    at = as_utc(now)
    result = dispatch_task(at, batch_size)
    webhooks = deliver_if_configured(at, batch_size)
    publish_messages(result, key="nurture-dispatch-messages")
    summary: dict[str, Any] = {str(k): v for k, v in result.by_status.items()}
    if result.found_in_doubt:
        summary["in_doubt_from_stopped_dispatchers"] = result.found_in_doubt
    if webhooks is not None:
        summary["webhooks"] = webhooks.as_json()
    return run_verdict(result, summary, webhooks=webhooks)
