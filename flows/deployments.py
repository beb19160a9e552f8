"""The deployments `nurture serve` runs from one process, mirroring prefect.yaml.

`nurture serve` is the embedded way to run on a schedule (no work pool, no
worker); prefect.yaml is the production way (`prefect deploy --all` + workers).
Both declare the same seven deployments with the same default schedules; an
operator may change the intervals of `nurture serve` with its options.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect.schedules import Cron, Interval

from flows.chunks import advance_chunk
from flows.cycle import dispatch_messages, nurture_cycle
from flows.maintenance import import_events, import_leads, rescore_all
from flows.reporting import nurture_report

CYCLE_EVERY = timedelta(minutes=10)
DISPATCH_EVERY = timedelta(minutes=1)
RESCORE_CRON = "0 3 * * *"
REPORT_CRON = "0 6 * * *"


def served_deployments(
    *, timezone: str = "UTC", cycle_every: timedelta = CYCLE_EVERY, dispatch_every: timedelta = DISPATCH_EVERY
) -> list[Any]:
    """Every nurture deployment, with its schedule (rescore-all nightly at 03:00, the report daily at 06:00,
    in ``timezone``)."""
    return [
        nurture_cycle.to_deployment(
            name="nurture-cycle",
            schedules=[Interval(cycle_every)],
            concurrency_limit=1,
            parameters={"batch_size": 2000, "dispatch": True, "fan_out": True},
            tags=["nurture"],
        ),
        dispatch_messages.to_deployment(
            name="dispatch",
            schedules=[Interval(dispatch_every)],
            parameters={"batch_size": 500},
            tags=["nurture"],
        ),
        rescore_all.to_deployment(
            name="rescore-all",
            schedules=[Cron(RESCORE_CRON, timezone=timezone)],
            concurrency_limit=1,
            parameters={"batch_size": 2000, "fan_out": True},
            tags=["nurture"],
        ),
        nurture_report.to_deployment(
            name="nurture-report",
            schedules=[Cron(REPORT_CRON, timezone=timezone)],
            concurrency_limit=1,
            parameters={"days": 30, "conversion_window_days": 14},
            tags=["nurture"],
        ),
        # The chunks of a cycle or rescore-all that fans out: run by this process's runner too.
        advance_chunk.to_deployment(name="advance-chunk", tags=["nurture"]),
        import_leads.to_deployment(name="import-leads", tags=["nurture"]),
        import_events.to_deployment(name="import-events", tags=["nurture"]),
    ]
