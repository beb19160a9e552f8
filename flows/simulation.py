"""``nurture simulate``: every lead replayed under the current and the new playbook, a batch at a time.

Load a batch of leads with their history (``db.simulation``, read-only), replay each under
both playbooks (``nurture.simulation``), count the differences (``nurture.impact``). Memory
holds one batch; the work grows with leads + events. No Prefect, and nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from db.cycle import all_lead_ids
from db.simulation import lead_histories, live_enrollments
from nurture.advancing import LeadSnapshot, plan_chunk
from nurture.history import LeadHistory
from nurture.impact import Impact, inflight_changes, step_order
from nurture.playbook import Playbook, Stage
from nurture.scoring import ActivityEvent
from nurture.simulation import replay_both

BATCH = 2000


def first_cycle_stages(leads: list[LeadHistory], *, playbook: Playbook, now: datetime) -> dict[int, Stage]:
    """Where a full rescore under ``playbook`` at ``now`` puts each lead, from its live stage (what
    the first cycle after a change of the scoring rules does: ``plan_chunk`` in replay mode)."""
    plan = plan_chunk(
        [LeadSnapshot(lead.id, lead.live_stage, lead.live_score, lead.profile) for lead in leads],
        events={lead.id: [ActivityEvent(e.kind, e.occurred_at) for e in lead.events] for lead in leads},
        counted={},
        playbook=playbook,
        now=now,
        replay=True,
    )
    return {score.lead_id: score.stage for score in plan.scores}


def simulate(
    *,
    engine: Engine,
    current: Playbook,
    new: Playbook,
    since: datetime,
    now: datetime,
    top: int = 10,
    whole_history: bool = False,
    batch_size: int = BATCH,
    progress: Callable[[int], None] | None = None,
) -> Impact:
    """The impact of replacing ``current`` by ``new``, over the window ``since`` → ``now``: the new
    playbook goes live at ``since`` (from the state the current one left each lead in), or with
    ``whole_history`` is in force from each lead's first event."""
    impact = Impact(
        since=since,
        now=now,
        current_version=current.version,
        new_version=new.version,
        top=top,
        order=step_order(new, current),
    )
    after = 0
    # One read-only transaction for every batch: the simulation sees one moment of the database.
    with Session(engine) as session:
        while True:
            ids = all_lead_ids(session=session, after_id=after, limit=batch_size)
            leads = lead_histories(session=session, lead_ids=ids, now=now)
            enrollments = live_enrollments(session=session, lead_ids=ids)
            switch_at = None if whole_history else since
            for lead in leads:
                impact.add(lead, *replay_both(lead, current, new, now=now, switch_at=switch_at))
            before = first_cycle_stages(leads, playbook=current, now=now)
            after_change = first_cycle_stages(leads, playbook=new, now=now)
            stages = {i: (before[i], after_change[i]) for i in before}
            impact.add_go_live(stages)
            impact.add_inflight(inflight_changes(enrollments, current=current, new=new, stage_now=stages))
            if progress is not None:
                progress(len(ids))
            if len(ids) < batch_size:
                session.rollback()
                return impact
            after = ids[-1]
