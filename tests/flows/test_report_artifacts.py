"""The report's charts published to a real (test) Prefect server, read back from its API."""

from __future__ import annotations

import base64
import io
import re
from datetime import date, timedelta

from PIL import Image
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.report_artifacts import CHARTS_ARTIFACT_KEY, markdown_text, publish_charts
from nurture.charts import ConversionBar, conversion_chart, funnel_chart

INLINE_PNG = re.compile(r"!\[((?:[^\]\\]|\\.)*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def test_both_charts_are_one_markdown_artifact_with_inline_pngs(prefect_api: str) -> None:
    days = [date(2026, 3, 2) + timedelta(days=k) for k in range(10)]
    funnel = funnel_chart(
        days,
        {"cold": [50 + k for k in range(10)], "warm": [5 + k for k in range(10)], "hot": list(range(10))},
        title="Leads by stage *this quarter*",
    )
    conversion = conversion_chart(
        [ConversionBar("welcome", 400, 36), ConversionBar("<demo> & [offer]", 80, 12)], title="Conversion"
    )

    @flow(name="publish-report-charts")
    def publish() -> str:
        return str(publish_charts(funnel, conversion))

    artifact_id = publish()

    with get_client(sync_client=True) as client:
        [artifact] = [
            a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[CHARTS_ARTIFACT_KEY]))
            )
            if str(a.id) == artifact_id
        ]
    assert artifact.type == "markdown"
    assert artifact.flow_run_id is not None, "published from a flow run, the artifact belongs to it"
    markdown = str(artifact.data)
    images = INLINE_PNG.findall(markdown)
    assert [alt for alt, _ in images] == [r"Leads by stage \*this quarter\*", "Conversion"]
    sizes = []
    for _, data in images:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG"
        sizes.append(image.size)
    assert sizes == [(funnel.width * 2, funnel.height * 2), (conversion.width * 2, conversion.height * 2)]
    # The numbers in words under each picture, with the sequence's name shown as typed.
    assert "On Mar 11, 2026: cold 59, warm 14, hot 9." in markdown
    assert r"\<demo\> \& \[offer\]: 12 / 80 (15.0%)" in markdown.replace("\\(", "(").replace("\\)", ")")


def test_text_from_data_cannot_become_markdown() -> None:
    assert markdown_text("# not a heading") == r"\# not a heading"
    assert markdown_text("1. not a list") == r"1\. not a list"
    assert markdown_text("<img src=x onerror=alert(1)>") == r"\<img src=x onerror=alert\(1\)\>"
    assert markdown_text("a\nb") == "a b"
    assert markdown_text("Mar 2, 2026 to Mar 31, 2026.") == "Mar 2, 2026 to Mar 31, 2026."


def test_the_daily_report_flow_publishes_the_table_and_the_charts(
    prefect_api: str, nurture_env: dict[str, str]
) -> None:
    """Cycles over ten simulated days send emails; the nurture-report flow then reads them back."""
    from db.engine import get_engine, session_scope, upgrade_schema
    from db.imports import add_events, upsert_leads
    from flows.cycle import nurture_cycle
    from flows.reporting import nurture_report
    from nurture.population import generate_population
    from tests.conftest import T0

    engine = get_engine(nurture_env["NURTURE_DATABASE_URL"])
    upgrade_schema(engine)
    population = generate_population(leads=60, start=T0, end=T0 + timedelta(days=10), seed=5)
    with session_scope(engine) as session:
        upsert_leads(session=session, records=population.leads, now=T0)
        add_events(session=session, records=population.events, now=T0)
    sent = 0
    for day in range(1, 11):
        summary = nurture_cycle(now=T0 + timedelta(days=day), batch_size=25)
        sent += summary["messages"].get("sent", 0)
    assert sent > 0

    result = nurture_report(now=T0 + timedelta(days=10, hours=1), days=30, conversion_window_days=14)
    assert result["emails"] == sent

    with get_client(sync_client=True) as client:
        [charts] = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[CHARTS_ARTIFACT_KEY]))
        )
        [table] = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["nurture-sequence-report"]))
        )
    alts = [alt for alt, _ in INLINE_PNG.findall(str(charts.data))]
    assert alts == [
        "Leads by stage, the last 30 days",
        r"Conversion per sequence, enrollments of the last 30 days \(within 14 days\)",
    ]
    assert charts.flow_run_id == table.flow_run_id  # both from the report's own run
    assert "60" in str(charts.data)  # the funnel's last day, in words: every lead counted
