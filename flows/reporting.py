"""The report in the Prefect UI: the sequence table each cycle, and a daily run with the charts too.

Each ``nurture-cycle`` run publishes ``nurture-sequence-report`` (a table: the last 30 days).
The ``nurture-report`` flow, scheduled daily, publishes the same table and
``nurture-report-charts`` (a markdown artifact with the funnel over time and conversion per
sequence as inline PNGs): drawing the charts costs a few tenths of a second, which a cycle
every ten minutes need not pay.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from db.analytics import Period, chart_data, sequence_report
from db.engine import session_scope
from flows.report_artifacts import publish_charts
from flows.runtime import as_utc, current_runtime, run_name
from nurture.charts import ConversionBar, report_charts
from nurture.reporting import Report, describe_duration

# The cycle's artifact: `nurture report`'s defaults.
REPORT_PERIOD = timedelta(days=30)
CONVERSION_WINDOW = timedelta(days=14)


def publish_sequence_report(
    at: datetime, *, period: timedelta = REPORT_PERIOD, window: timedelta = CONVERSION_WINDOW
) -> Report:
    """The ``nurture-sequence-report`` table: per sequence, step and variant, counts, rates and verdicts."""
    runtime = current_runtime()
    with session_scope(runtime.engine, commit=False) as session:
        report = sequence_report(
            session=session, playbook=runtime.playbook, period=Period(at - period, at), conversion_window=window
        )
    verdicts = [
        f"{s.sequence}/{step.step}: {step.verdict.summary}"
        for s in report.sequences
        for step in s.steps
        if step.verdict is not None
    ]
    span = describe_duration(period)
    create_table_artifact(
        key="nurture-sequence-report",
        table=report.rows() or [{"sequence": f"(no email sent in the last {span})"}],
        description=(
            f"Emails sent in the {span} to {at:%Y-%m-%d %H:%M} UTC: opened and clicked by people (machine "
            f"opens apart), conversions within {describe_duration(window)}; rates per delivered email. "
            "Split tests: " + ("; ".join(verdicts) or "none in this period")
        ),
    )
    return report


@flow(name="nurture-report", flow_run_name=lambda: run_name("report"), log_prints=False)
def nurture_report(now: datetime | None = None, days: int = 30, conversion_window_days: int = 14) -> dict[str, Any]:
    """Publish the sequence report and its charts (funnel over time, conversion per sequence).

    Args:
        now: Report up to this time (default: now).
        days: The period: emails sent, enrollments started and days drawn, this many days back.
        conversion_window_days: A conversion counts for an email (an enrollment) this many days before it.
    """
    at = as_utc(now)
    period, window = timedelta(days=days), timedelta(days=conversion_window_days)
    report = publish_sequence_report(at, period=period, window=window)
    runtime = current_runtime()
    with session_scope(runtime.engine, commit=False) as session:
        days_, stages, conversions = chart_data(
            session=session, playbook=runtime.playbook, period=Period(at - period, at), window=window
        )
    funnel, conversion = report_charts(
        days_,
        stages,
        [ConversionBar(c.sequence, c.enrolled, c.converted) for c in conversions],
        period=f"the last {describe_duration(period)}",
        window=describe_duration(window),
    )
    publish_charts(funnel, conversion)
    return {
        "sequences": len(report.sequences),
        "emails": sum(s.total.sent for s in report.sequences),
        "verdicts": {
            f"{s.sequence}/{step.step}": step.verdict.summary
            for s in report.sequences
            for step in s.steps
            if step.verdict is not None
        },
    }
