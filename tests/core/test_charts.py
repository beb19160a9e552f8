"""The report's charts, read back: SVG parsed as XML, PNG opened with Pillow (pure, no database)."""

from __future__ import annotations

import io
import itertools
import re
import xml.etree.ElementTree as ET
from datetime import date, timedelta
from pathlib import Path

import pytest
from PIL import Image

from nurture.chart_drawing import Chart, Rect, Text, text_width
from nurture.charts import (
    BARS_UP_TO_DAYS,
    NO_DATA,
    STAGE_COLOURS,
    ConversionBar,
    conversion_chart,
    date_ticks,
    funnel_chart,
)
from tests.sample_charts import main

SVG = "{http://www.w3.org/2000/svg}"
MONDAY = date(2026, 3, 2)


def days(n: int, start: date = MONDAY) -> list[date]:
    return [start + timedelta(days=k) for k in range(n)]


def growing_funnel(n: int) -> dict[str, list[int]]:
    """Leads arriving every day and warming up over time."""
    return {
        "cold": [40 + 3 * k for k in range(n)],
        "warm": [10 + 2 * k for k in range(n)],
        "hot": [3 + k for k in range(n)],
        "customer": [k // 2 for k in range(n)],
    }


def parse(chart: Chart) -> ET.Element:
    return ET.fromstring(chart.svg().encode())


def texts(root: ET.Element) -> list[str]:
    return [el.text or "" for el in root.iter(f"{SVG}text")]


def rects(root: ET.Element, fill: str) -> list[dict[str, float]]:
    """The rectangles of a colour below the heading (the legend's swatches are above y=100)."""
    found = [
        {k: float(el.attrib[k]) for k in ("x", "y", "width", "height")}
        for el in root.iter(f"{SVG}rect")
        if el.attrib["fill"] == fill
    ]
    return [r for r in found if r["y"] > 100]


def png_image(chart: Chart, scale: int = 2) -> Image.Image:
    image = Image.open(io.BytesIO(chart.png(scale=scale)))
    image.load()
    return image


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def test_the_funnel_draws_a_bar_per_day_and_stage_with_heights_in_proportion() -> None:
    n = 14
    stages = growing_funnel(n)
    root = parse(funnel_chart(days(n), stages, title="Leads by stage"))

    assert root.find(f"{SVG}title") is not None
    assert root.findtext(f"{SVG}title") == "Leads by stage"
    labels = texts(root)
    assert "Leads by stage" in labels
    # The legend gives each stage's count on the last day, coldest first.
    legend = [label for label in labels if label.split(" ")[0] in STAGE_COLOURS]
    assert legend == ["cold 79", "warm 36", "hot 16", "customer 6"]
    cold, warm = rects(root, STAGE_COLOURS["cold"]), rects(root, STAGE_COLOURS["warm"])
    # No customers on the first two days: no empty sliver is drawn for them.
    assert len(cold) == len(warm) == n
    assert len(rects(root, STAGE_COLOURS["customer"])) == n - 2
    for k in range(n):
        # Stacked: warm right under cold, heights in the ratio of the counts.
        assert warm[k]["y"] == pytest.approx(cold[k]["y"] + cold[k]["height"], abs=0.02)
        ratio = cold[k]["height"] / warm[k]["height"]
        assert ratio == pytest.approx(stages["cold"][k] / stages["warm"][k], rel=1e-3)
    # A bar per day, left to right.
    assert [r["x"] for r in cold] == sorted(r["x"] for r in cold)
    description = root.findtext(f"{SVG}desc") or ""
    assert "Mar 15, 2026: cold 79, warm 36, hot 16, customer 6" in description


def test_the_y_axis_has_round_ticks_with_thousands_separators_above_the_largest_total() -> None:
    stages = {"cold": [1_000_000, 1_234_567], "warm": [0, 5], "hot": [0, 0], "customer": [0, 0]}
    root = parse(funnel_chart(days(2), stages, title="A million leads"))
    ticks = [int(label.replace(",", "")) for label in texts(root) if re.fullmatch(r"\d{1,3}(,\d{3})*", label)]
    assert ticks[0] == 0
    step = ticks[1]
    assert re.fullmatch(r"(1|2|25|5)0*", str(step)), step
    assert ticks == [k * step for k in range(len(ticks))]
    assert ticks[-1] >= 1_234_572 > ticks[-2]
    assert "1,000,000" in texts(root)
    assert "cold 1,234,567" in texts(root)


@pytest.mark.parametrize("n", [7, 30, 60, 61, 90, 365, 730])
def test_date_labels_fit_and_are_evenly_spaced_from_a_week_to_two_years(n: int) -> None:
    chart = funnel_chart(days(n), growing_funnel(n), title="Funnel")
    root = parse(chart)
    tick_texts = [el for el in root.iter(f"{SVG}text") if el.attrib.get("text-anchor") == "middle"]
    assert 2 <= len(tick_texts) <= 16
    spans = []
    for el in tick_texts:
        x, width = float(el.attrib["x"]), text_width(el.text or "", int(el.attrib["font-size"]))
        spans.append((x - width / 2, x + width / 2))
        assert x - width / 2 >= 0
        assert x + width / 2 <= chart.width
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans)), "tick labels overlap"
    kind = "Stacked bars" if n <= BARS_UP_TO_DAYS else "Stacked area"
    assert (root.findtext(f"{SVG}desc") or "").startswith(kind)


def test_tick_spacing_goes_from_days_to_mondays_to_months() -> None:
    week = date_ticks(days(7), 880)
    assert [label for _, label in week] == ["Mar 2", "Mar 3", "Mar 4", "Mar 5", "Mar 6", "Mar 7", "Mar 8"]
    two_months = days(60, start=date(2026, 3, 4))  # a Wednesday
    ticks = date_ticks(two_months, 880)
    assert all(two_months[i].weekday() == 0 for i, _ in ticks), "weekly ticks fall on Mondays"
    two_years = days(730, start=date(2026, 3, 15))
    ticks = date_ticks(two_years, 880)
    assert all(two_years[i].day == 1 for i, _ in ticks), "long ranges tick on the 1st of a month"
    labels = [label for _, label in ticks]
    assert labels[0].endswith("2026")
    assert any(label == "Jan 2027" for label in labels), "a new year is named"


def test_a_single_day_is_one_bar_per_stage() -> None:
    root = parse(funnel_chart([MONDAY], {"cold": [5], "warm": [2], "hot": [1], "customer": [0]}, title="Day one"))
    assert [len(rects(root, STAGE_COLOURS[s])) for s in ("cold", "warm", "hot", "customer")] == [1, 1, 1, 0]
    assert "Mar 2" in texts(root)


@pytest.mark.parametrize(
    ("day_list", "stages"),
    [([], {}), ([], {"cold": [], "warm": []}), (days(3), {"cold": [0, 0, 0], "warm": [0, 0, 0]})],
)
def test_no_data_draws_a_chart_that_says_so(day_list: list[date], stages: dict[str, list[int]]) -> None:
    chart = funnel_chart(day_list, stages, title="Funnel")
    assert NO_DATA in texts(parse(chart))
    assert png_image(chart).size == (chart.width * 2, chart.height * 2)
    empty = conversion_chart([], title="Conversion")
    assert NO_DATA in texts(parse(empty))
    png_image(empty)


def test_bad_funnel_input_is_refused_with_what_was_wrong() -> None:
    with pytest.raises(ValueError, match="stage 'warm' has 2 counts for 3 days"):
        funnel_chart(days(3), {"cold": [1, 2, 3], "warm": [1, 2]}, title="x")
    with pytest.raises(ValueError, match="increasing order"):
        funnel_chart([MONDAY, MONDAY], {"cold": [1, 2]}, title="x")
    with pytest.raises(ValueError, match="negative"):
        funnel_chart([MONDAY], {"cold": [-1]}, title="x")


def test_conversion_bars_are_labelled_and_as_long_as_their_rate() -> None:
    rows = [
        ConversionBar("welcome", enrolled=1240, converted=87),
        ConversionBar("hot-follow-up", enrolled=310, converted=52),
        ConversionBar("win-back", enrolled=0, converted=0),
        ConversionBar("big-list", enrolled=1_000_000, converted=3),
    ]
    chart = conversion_chart(rows, title="Conversion per sequence")
    root = parse(chart)
    labels = texts(root)
    assert "87 / 1,240 (7.0%)" in labels
    assert "52 / 310 (16.8%)" in labels
    assert "0 / 0 (no enrollments)" in labels
    assert "3 / 1,000,000 (<0.1%)" in labels
    names = [t for t in labels if t in {r.sequence for r in rows}]
    assert names == ["welcome", "hot-follow-up", "win-back", "big-list"]
    bars = rects(root, "#2563eb")
    assert len(bars) == 3, "no bar for a sequence nobody enrolled in"
    assert bars[1]["width"] / bars[0]["width"] == pytest.approx((52 / 310) / (87 / 1240), rel=1e-3)
    assert len({b["x"] for b in bars}) == 1, "bars start from the same axis"
    assert chart.height > 100 + 30 * len(rows)


def test_conversion_rate_labels_never_round_to_the_wrong_end() -> None:
    assert ConversionBar("s", enrolled=10_000, converted=9_999).label == "9,999 / 10,000 (>99.9%)"
    assert ConversionBar("s", enrolled=10, converted=10).label == "10 / 10 (100%)"
    assert ConversionBar("s", enrolled=10, converted=0).label == "0 / 10 (0.0%)"
    with pytest.raises(ValueError, match="'s': 11 converted of only 10 enrolled"):
        ConversionBar("s", enrolled=10, converted=11)


def test_a_very_long_sequence_name_is_cut_with_an_ellipsis() -> None:
    name = "nurture-for-enterprise-leads-who-downloaded-the-whitepaper-and-attended-the-webinar-" * 3
    root = parse(conversion_chart([ConversionBar(name, 50, 5)], title="Conversion"))
    (shown,) = [t for t in texts(root) if t.startswith("nurture-for-enterprise")]
    assert shown.endswith("…")
    assert name.startswith(shown[:-1])
    assert text_width(shown, 13) <= 260


def test_text_is_escaped_and_characters_xml_cannot_hold_are_dropped() -> None:
    title = 'Q3 <review> & "pipeline"\x00\x07'
    rows = [ConversionBar("a&b <c>", 4, 1)]
    for chart in (conversion_chart(rows, title=title), funnel_chart([MONDAY], {"cold": [1]}, title=title)):
        root = parse(chart)
        assert root.findtext(f"{SVG}title") == 'Q3 <review> & "pipeline"'
        assert 'Q3 <review> & "pipeline"' in texts(root)
    assert "a&b <c>" in texts(parse(conversion_chart(rows, title=title)))


def test_the_png_is_the_same_drawing_at_the_expected_size() -> None:
    n = 20
    chart = funnel_chart(days(n), growing_funnel(n), title="Funnel")
    image = png_image(chart).convert("RGB")
    assert image.size == (1920, 1080)
    assert png_image(chart, scale=1).size == (960, 540)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20) or []}
    for stage in ("cold", "warm", "hot", "customer"):
        assert rgb(STAGE_COLOURS[stage]) in colours, stage
    # Every large enough rectangle of the layout is filled with its colour at its centre in the PNG.
    checked = 0
    for shape in chart.shapes:
        if isinstance(shape, Rect) and shape.width >= 4 and shape.height >= 4:
            centre = (int((shape.x + shape.width / 2) * 2), int((shape.y + shape.height / 2) * 2))
            assert image.getpixel(centre) == rgb(shape.fill), shape
            checked += 1
    assert checked >= 3 * n
    # Text is drawn: the title's area is not blank.
    title = next(s for s in chart.shapes if isinstance(s, Text) and s.text == "Funnel")
    box = image.crop((int(title.x * 2), int((title.y - title.size) * 2), int((title.x + 80) * 2), int(title.y * 2)))
    assert len(box.getcolors(maxcolors=1 << 16) or []) > 5


def test_the_conversion_png_has_its_bars_and_labels() -> None:
    chart = conversion_chart([ConversionBar("welcome", 100, 40), ConversionBar("win-back", 80, 8)], title="Conv")
    image = png_image(chart).convert("RGB")
    assert image.size == (chart.width * 2, chart.height * 2)
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert rgb("#2563eb") in {c for _, c in colours}
    assert len(colours) > 20, "anti-aliased text and bars, not a blank image"


def test_the_sample_charts_in_the_docs_can_be_drawn_again(tmp_path: Path) -> None:
    main(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["conversion.png", "conversion.svg", "funnel.png", "funnel.svg"]
    funnel = ET.fromstring((tmp_path / "funnel.svg").read_bytes())
    assert (funnel.findtext(f"{SVG}desc") or "").startswith("Stacked area")
    assert Image.open(tmp_path / "conversion.png").size[0] == 1920
