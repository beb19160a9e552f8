"""Advancing leads in chunks side by side: threads of the flow's process, or flow runs on several workers.

Before scoring, the work is cut into disjoint lead-id ranges (``db.chunks``): a
cycle's candidates every ``batch_size`` ids, a replay's leads every
``replay_chunk_size`` ids. One ``advance-leads`` task scores one range in one
transaction, so

- a cycle runs ``ceil(candidates / batch_size)`` chunk tasks, a replay of a
  million leads at most 50 (``REPLAY_TASK_RUNS``);
- two chunks never hold the same lead (by construction; each chunk still locks
  its leads, the safety net against any other writer);
- a chunk that fails (after its task's retries) rolled back: the others are
  kept, the flow ends Failed naming it, and the next cycle picks its leads up.

In-process, the chunks run in a ``ThreadPoolTaskRunner`` of
``NURTURE_CHUNK_CONCURRENCY`` threads (1 on SQLite). With ``fan_out``, each
range becomes a flow run of the ``advance-chunk`` deployment, so every process
worker on the pool takes chunks; the parent waits for them all and sums their
results (a small JSON dict each, persisted in Prefect's result storage).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from db.chunks import LeadRange, candidate_ranges, candidates_in_range, lead_ranges, leads_in_range
from db.cycle import ChunkResult
from db.engine import session_scope
from flows.advancing import advance_leads
from flows.runtime import current_runtime
from nurture.advancing import StageMove
from nurture.playbook import Stage
from nurture.webhooks import WebhookEvent, event_payload

# Rows shown in a run's per-lead tables; the counts above them are always complete.
ARTIFACT_ROWS = 500
ADVANCE_CHUNK_DEPLOYMENT = "advance-chunk/advance-chunk"
# How often a fanned-out parent asks the Prefect API whether its chunk runs have finished.
POLL_SECONDS = 2.0


@dataclass
class Advanced:
    """What advancing every chunk did (summed), and the chunks that failed (named for the run's state)."""

    result: ChunkResult = field(default_factory=ChunkResult)
    chunks: int = 0
    failed: list[str] = field(default_factory=list)


def split(at: datetime, size: int, *, replay: bool) -> list[LeadRange]:
    """The lead-id ranges of a cycle at ``at`` (its candidates) or of a replay (every lead), ``size`` leads each."""
    with session_scope(current_runtime().engine) as session:
        if replay:
            return lead_ranges(session=session, size=size)
        return candidate_ranges(session=session, now=at, size=size)


def emit_transition_events(result: ChunkResult, playbook_version: str, *, personal_data: bool = False) -> None:
    """One Prefect event per transition and per conversion, for Automations ("tell sales when a lead turns hot").

    The payload is a webhook's content (docs/webhooks.md): the lead's stage, scores and score
    breakdown, the transition or conversion; who the lead is (email, name, company, profile,
    attributes) only with ``personal_data`` (NURTURE_PREFECT_EVENTS_PERSONAL_DATA).
    ``emit_event`` only queues the event for Prefect's background worker, so a
    chunk with thousands of transitions is not slowed by round trips.
    """
    for fact in result.facts:
        payload = event_payload(fact, playbook_version=playbook_version, personal_data=personal_data)
        resource = {"prefect.resource.id": f"nurture.lead.{fact.lead.id}", "nurture.stage": fact.lead.stage}
        if fact.event == WebhookEvent.transitioned:
            resource["nurture.stage"] = fact.detail["to"]
            resource["nurture.stage.from"] = fact.detail["from"]
            payload |= {"from": fact.detail["from"], "to": fact.detail["to"], "score": round(fact.lead.score, 2)}
            emit_event(event="nurture.lead.transitioned", resource=resource, payload=payload)
        elif fact.event == WebhookEvent.converted:
            resource["nurture.sequence"] = fact.detail["sequence"]
            emit_event(event="nurture.lead.converted", resource=resource, payload=payload)


# Safe to retry: a failed chunk rolled back, and a committed one has no candidates left.
@task(
    name="advance-leads",
    task_run_name="advance-leads-{chunk}/{chunks}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=10,
)
def advance_chunk_task(
    now: datetime, lo: int, hi: int, chunk: int, chunks: int, replay: bool = False, dry_run: bool = False
) -> ChunkResult:
    """Score the leads of one id range (``lo..hi``), apply their transitions and enrollments in one transaction.

    A cycle's chunk takes the range's candidates at ``now``, a replay's every lead of the range.
    A dry run does the same work and rolls it back: the result says what would happen.
    """
    runtime = current_runtime()
    run_id = str(flow_run.id) if flow_run.id else None
    with session_scope(runtime.engine, commit=not dry_run) as session:
        if replay:
            lead_ids = leads_in_range(session=session, lo=lo, hi=hi)
        else:
            lead_ids = candidates_in_range(session=session, now=now, lo=lo, hi=hi)
        result = advance_leads(
            session=session, lead_ids=lead_ids, playbook=runtime.playbook, now=now, flow_run_id=run_id, replay=replay
        )
    if not dry_run:
        personal = runtime.settings.nurture_prefect_events_personal_data
        emit_transition_events(result, runtime.playbook.version, personal_data=personal)
    return result


def advance_in_chunks(
    at: datetime, size: int, *, replay: bool = False, dry_run: bool = False, fan_out: bool = False
) -> Advanced:
    """Cut the work into ranges of ``size`` leads and advance them all, side by side; a failed chunk stops no other.

    With ``fan_out`` (and more than one range) each range is a flow run of the ``advance-chunk``
    deployment, taken by whichever worker of the pool is free; otherwise they are tasks of this run.
    """
    ranges = split(at, size, replay=replay)
    if fan_out and len(ranges) > 1:
        return _advance_on_workers(at, ranges, replay=replay, dry_run=dry_run)
    return _advance_in_threads(at, ranges, replay=replay, dry_run=dry_run)


def _label(k: int, ranges: Sequence[LeadRange]) -> str:
    r = ranges[k - 1]
    return f"chunk {k}/{len(ranges)} (leads {r.lo}–{r.hi})"


def _advance_in_threads(at: datetime, ranges: Sequence[LeadRange], *, replay: bool, dry_run: bool) -> Advanced:
    logger = get_run_logger()
    advanced = Advanced(chunks=len(ranges))
    n = len(ranges)
    workers = max(1, min(current_runtime().settings.chunk_concurrency, n))
    runner: ThreadPoolTaskRunner[ChunkResult]
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        futures: list[PrefectFuture[ChunkResult]] = [
            runner.submit(
                advance_chunk_task,  # type: ignore[arg-type]  # mypy takes Prefect's first overload, for async tasks
                parameters={
                    "now": at,
                    "lo": r.lo,
                    "hi": r.hi,
                    "chunk": k,
                    "chunks": n,
                    "replay": replay,
                    "dry_run": dry_run,
                },
            )
            for k, r in enumerate(ranges, start=1)
        ]
        wait(futures)
    for k, future in enumerate(futures, start=1):
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, ChunkResult):
            advanced.result.add(outcome)
        else:
            logger.error("%s failed, rolled back (the next cycle takes its leads): %s", _label(k, ranges), outcome)
            advanced.failed.append(_label(k, ranges))
    return advanced


@flow(
    name="advance-chunk",
    flow_run_name="advance-leads-{chunk}/{chunks}",
    persist_result=True,
    result_serializer="json",
)
def advance_chunk(
    now: datetime, lo: int, hi: int, chunk: int = 1, chunks: int = 1, replay: bool = False, dry_run: bool = False
) -> dict[str, Any]:
    """Advance one range of leads (``lo..hi``) for a cycle or rescore-all that fanned out over the workers.

    Started by its parent run (``fan_out``), one run per range; it returns what the chunk did as a
    small JSON dict that the parent sums. A failed run rolled back: the next cycle takes its leads.

    Args:
        now: The parent's ``now``.
        lo: The first lead id of the range.
        hi: The last lead id of the range (included).
        chunk: Its place among the parent's chunks, for its name.
        chunks: How many chunks the parent has.
        replay: Recompute the scores from every event (rescore-all) instead of bringing them forward.
        dry_run: Do the work, then roll it back.
    """
    return chunk_summary(advance_chunk_task(now, lo, hi, chunk, chunks, replay, dry_run))


def chunk_summary(result: ChunkResult) -> dict[str, Any]:
    """A chunk's result as JSON: every count, and its first ``ARTIFACT_ROWS`` transitions (what a report shows)."""
    return {
        "leads": result.leads,
        "score_changes": result.score_changes,
        "transitions": dict(result.transitions),
        "enrollments": result.enrollments,
        "enrollments_skipped": result.enrollments_skipped,
        "conversions": result.conversions,
        "messages_cancelled": result.messages_cancelled,
        "last_lead_id": result.last_lead_id,
        "moved": [
            [m.lead_id, m.from_stage.value, m.to_stage.value, m.score, m.reason] for m in result.moved[:ARTIFACT_ROWS]
        ],
    }


def chunk_from_summary(summary: dict[str, Any]) -> ChunkResult:
    """The inverse of :func:`chunk_summary` (with the transitions it kept)."""
    return ChunkResult(
        leads=int(summary["leads"]),
        score_changes=int(summary["score_changes"]),
        transitions=Counter({str(k): int(v) for k, v in summary["transitions"].items()}),
        enrollments=int(summary["enrollments"]),
        enrollments_skipped=int(summary["enrollments_skipped"]),
        conversions=int(summary["conversions"]),
        messages_cancelled=int(summary["messages_cancelled"]),
        last_lead_id=int(summary["last_lead_id"]),
        moved=[
            StageMove(int(lead), Stage(from_stage), Stage(to_stage), float(score), str(reason))
            for lead, from_stage, to_stage, score, reason in summary["moved"]
        ],
    )


def _advance_on_workers(at: datetime, ranges: Sequence[LeadRange], *, replay: bool, dry_run: bool) -> Advanced:
    """One ``advance-chunk`` flow run per range, all created at once; wait for every one and sum their results.

    The workers' ``--limit`` (and how many there are) bound how many chunks run at once. The parent
    holds a worker slot while it waits: a pool needs room for at least one chunk run beside it.
    """
    logger = get_run_logger()
    n = len(ranges)
    children: list[FlowRun] = []
    for k, r in enumerate(ranges, start=1):
        parameters = {"now": at, "lo": r.lo, "hi": r.hi, "chunk": k, "chunks": n, "replay": replay, "dry_run": dry_run}
        # timeout=0: created now, all of them, and waited for below all together.
        child = run_deployment(
            ADVANCE_CHUNK_DEPLOYMENT, parameters=parameters, flow_run_name=f"advance-leads-{k}/{n}", timeout=0
        )
        assert isinstance(child, FlowRun)  # called from sync code: the run itself, not a coroutine
        children.append(child)
    logger.info("%d chunks started as %s flow runs; waiting for the workers", n, ADVANCE_CHUNK_DEPLOYMENT)
    finished = wait_for_flow_runs([child.id for child in children])
    advanced = Advanced(chunks=n)
    for k, child in enumerate(children, start=1):
        run = finished[child.id]
        state = run.state
        if state is None or not state.is_completed():
            why = f"{state.type.value}: {state.message}" if state is not None else "no state"
            logger.error("%s (flow run %s) ended %s; its leads wait for the next cycle", _label(k, ranges), run.id, why)
            advanced.failed.append(_label(k, ranges))
            continue
        summary = state.result(raise_on_failure=False)
        if not isinstance(summary, dict):
            # Its work is committed; only the counts are missing from this run's report.
            logger.warning("%s completed, but its result could not be read: %s", _label(k, ranges), summary)
            continue
        advanced.result.add(chunk_from_summary(summary))
    return advanced


def wait_for_flow_runs(ids: Sequence[UUID], *, poll_seconds: float = POLL_SECONDS) -> dict[UUID, FlowRun]:
    """Poll the Prefect API until every one of these flow runs is in a final state; returns them by id."""
    pending = set(ids)
    done: dict[UUID, FlowRun] = {}
    with get_client(sync_client=True) as client:
        while pending:
            asked = sorted(pending)
            runs = [
                run
                for start in range(0, len(asked), 100)
                for run in client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=asked[start : start + 100])), limit=100
                )
            ]
            for run in runs:
                if run.state is not None and run.state.is_final():
                    done[run.id] = run
                    pending.discard(run.id)
            if pending:
                time.sleep(poll_seconds)
    return done
