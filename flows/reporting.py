"""The sequence report as a Prefect artifact: each cycle's run shows what the emails of the last 30 days did."""

from __future__ import annotations

from datetime import datetime, timedelta

from prefect.artifacts import create_table_artifact

from db.analytics import Period, sequence_report
from db.engine import session_scope
from flows.runtime import current_runtime
from nurture.reporting import Report

# The artifact's period and conversion window: `nurture report`'s defaults.
REPORT_PERIOD = timedelta(days=30)
CONVERSION_WINDOW = timedelta(days=14)


def cycle_report(at: datetime) -> Report:
    runtime = current_runtime()
    with session_scope(runtime.engine, commit=False) as session:
        return sequence_report(
            session=session,
            playbook=runtime.playbook,
            period=Period(at - REPORT_PERIOD, at),
            conversion_window=CONVERSION_WINDOW,
        )


def publish_sequence_report(at: datetime) -> Report:
    """The ``nurture-sequence-report`` table: per sequence, step and variant, counts, rates and verdicts."""
    report = cycle_report(at)
    verdicts = [
        f"{s.sequence}/{step.step}: {step.verdict.summary}"
        for s in report.sequences
        for step in s.steps
        if step.verdict is not None
    ]
    create_table_artifact(
        key="nurture-sequence-report",
        table=report.rows() or [{"sequence": "(no email sent in the last 30 days)"}],
        description=(
            f"Emails sent in the 30 days to {at:%Y-%m-%d %H:%M} UTC: opened and clicked by people (machine "
            "opens apart), conversions within 14 days; rates per delivered email. Split tests: "
            + ("; ".join(verdicts) or "none in this period")
        ),
    )
    return report
