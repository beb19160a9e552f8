"""The report's charts in the Prefect UI: one markdown artifact with both charts as inline images.

A markdown artifact whose images are ``data:image/png;base64,…`` URLs renders in both of
Prefect 3.8.8's UIs (the default one and the one at ``/v2``), with no file server and
nothing to host: the image travels in the artifact. An image artifact
(``create_image_artifact``) also accepts a data URL, but the UI prints the whole URL
under the picture, so markdown it is. PNG rather than SVG: a person can copy the picture
from the UI and paste it into a deck or a slide tool that takes no SVG. Each chart's
description (the numbers in words) follows it, for screen readers and for the raw view.
"""

from __future__ import annotations

import base64
import re
from uuid import UUID

from prefect.artifacts import create_markdown_artifact

from nurture.chart_drawing import Chart

CHARTS_ARTIFACT_KEY = "nurture-report-charts"
# Backslash-escaped in text taken from data (titles, sequence names), so it shows as typed:
# anywhere in a line, what starts emphasis, code, links, HTML or tables; at its start, block markers.
_INLINE_SPECIAL = re.compile(r"([\\`*_{}\[\]()|<>&~])")
_BLOCK_MARKER = re.compile(r"^(\s*)(#|>|\+|=|-|\d+\.)")


def _escape_marker(match: re.Match[str]) -> str:
    indent, marker = match.groups()
    return f"{indent}{marker[:-1]}\\{marker[-1]}"


def markdown_text(text: str) -> str:
    """Text shown as typed in markdown, on one line."""
    escaped = _INLINE_SPECIAL.sub(r"\\\1", " ".join(text.splitlines()))
    return _BLOCK_MARKER.sub(_escape_marker, escaped)


def charts_markdown(*charts: Chart, heading: str = "Charts") -> str:
    """Markdown showing each chart as an inline PNG (2× for sharp screens), its description under it."""
    parts = [f"# {markdown_text(heading)}"]
    for chart in charts:
        data = base64.b64encode(chart.png(scale=2)).decode("ascii")
        parts.append(f"![{markdown_text(chart.title)}](data:image/png;base64,{data})")
        parts.append(markdown_text(chart.description))
    return "\n\n".join(parts) + "\n"


def publish_charts(
    funnel: Chart, conversion: Chart, *, key: str = CHARTS_ARTIFACT_KEY, heading: str = "Funnel and conversion"
) -> UUID:
    """Publish both charts as one markdown artifact (key ``nurture-report-charts`` by default); returns its id.

    In a flow run the artifact belongs to that run; outside one it still appears under
    Artifacts in the UI, by its key.
    """
    artifact_id = create_markdown_artifact(
        markdown=charts_markdown(funnel, conversion, heading=heading),
        key=key,
        description=f"{funnel.title}; {conversion.title}",
    )
    assert isinstance(artifact_id, UUID), "called from synchronous code, Prefect returns the id itself"
    return artifact_id
