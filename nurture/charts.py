"""Charts people paste into a deck: the funnel over time, and conversion per sequence.

Both builders are pure: they take counts (``db.funnel_history.stages_by_day`` and the
report's per-sequence numbers give them) and lay out a :class:`~nurture.chart_drawing.Chart`,
which draws itself as SVG or PNG from the same shapes.

- :func:`funnel_chart`: leads in each stage at the end of each day, stacked, coldest on
  top, with a legend giving the last day's counts. Up to 60 days it draws one bar per
  day; longer ranges are a stacked area. The date axis picks the finest spacing whose
  labels fit: every day, every 2 days, Mondays, every other Monday, then the 1st of every
  1, 2, 3, 6 or 12 months.
- :func:`conversion_chart`: one horizontal bar per sequence, its length the conversion
  rate on a round percentage axis, labelled "converted / enrolled (rate)".

Counts print with thousands separators; no data draws a chart that says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from itertools import pairwise

from nurture.chart_drawing import Chart, Line, Polygon, Rect, Shape, Text, text_width, truncate

__all__ = ["STAGE_COLOURS", "Chart", "ConversionBar", "conversion_chart", "funnel_chart", "report_charts"]

# The stages' colours, as in `nurture diagram`; other series take the spare ones in order.
STAGE_COLOURS = {"cold": "#2563eb", "warm": "#d97706", "hot": "#dc2626", "customer": "#16a34a"}
_SPARE_COLOURS = ("#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569")
WIDTH = 960
FUNNEL_HEIGHT = 540
_PAD = 24
_TITLE_SIZE = 20
_LABEL_SIZE = 13
_SMALL_SIZE = 12
_MUTED = "#6b7280"
_GRID = "#e5e7eb"
_AXIS = "#9ca3af"
_BAR = "#2563eb"
# Up to this many days the funnel is a bar per day; beyond, bars would be thinner than their gaps.
BARS_UP_TO_DAYS = 60
_WIDEST_BAR = 64.0  # a week or a single day stays a row of bars, not a wall
_NAME_COLUMN = 260  # the widest a sequence's name is drawn before it is cut with "…"
_ROW = 30
_BAR_HEIGHT = 18
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
NO_DATA = "no data yet"


@dataclass(frozen=True)
class ConversionBar:
    """One sequence's enrollments and how many of them converted."""

    sequence: str
    enrolled: int
    converted: int

    def __post_init__(self) -> None:
        if self.enrolled < 0 or self.converted < 0:
            raise ValueError(f"sequence {self.sequence!r}: counts cannot be negative")
        if self.converted > self.enrolled:
            raise ValueError(
                f"sequence {self.sequence!r}: {self.converted:,} converted of only {self.enrolled:,} enrolled"
            )

    @property
    def rate(self) -> float | None:
        """Converted / enrolled, or None when nobody was enrolled."""
        return self.converted / self.enrolled if self.enrolled else None

    @property
    def label(self) -> str:
        """ "converted / enrolled (rate)", as printed beside the bar."""
        if self.rate is None:
            return "0 / 0 (no enrollments)"
        return f"{self.converted:,} / {self.enrolled:,} ({percent(self.rate)})"


def percent(rate: float) -> str:
    """A rate as a percentage with one decimal; never rounded to 0% or 100% when it is neither."""
    value = rate * 100
    if 0 < value < 0.05:
        return "<0.1%"
    if 99.95 <= value < 100:
        return ">99.9%"
    return "100%" if value == 100 else f"{value:.1f}%"


def funnel_chart(days: Sequence[date], stages: Mapping[str, Sequence[int]], *, title: str) -> Chart:
    """Leads in each stage at the end of each day, stacked, one colour per stage, coldest on top.

    ``stages`` maps each stage (coldest first) to its count on each of ``days`` (increasing).
    """
    days = list(days)
    series = {name: [int(v) for v in values] for name, values in stages.items()}
    for name, values in series.items():
        if len(values) != len(days):
            raise ValueError(f"stage {name!r} has {len(values)} counts for {len(days)} days")
        if any(v < 0 for v in values):
            raise ValueError(f"stage {name!r} has a negative count")
    if any(a >= b for a, b in pairwise(days)):
        raise ValueError("days must be in increasing order, each once")
    totals = [sum(column) for column in zip(*series.values(), strict=True)] if series else [0] * len(days)
    if not days or max(totals) == 0:
        subtitle = "Leads in each stage at the end of each day (UTC)"
        return _no_data(title, subtitle, FUNNEL_HEIGHT)

    span = _date(days[0]) if len(days) == 1 else f"{_date(days[0])} to {_date(days[-1])}"
    shapes = _heading(title, f"Leads in each stage at the end of each day (UTC), {span}")
    colours = _colours(series)
    x = float(_PAD)
    for name, values in series.items():
        label = f"{name} {values[-1]:,}"
        shapes += [Rect(x, 73, 12, 12, colours[name]), Text(x + 18, 84, label, _LABEL_SIZE)]
        x += 18 + text_width(label, _LABEL_SIZE) + 24

    top, bottom = 112.0, FUNNEL_HEIGHT - 48.0
    step, y_max = _nice_scale(max(totals))
    y_ticks = range(0, y_max + 1, step)
    left = _PAD + max(text_width(f"{v:,}", _SMALL_SIZE) for v in y_ticks) + 10
    right = WIDTH - _PAD

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * value / y_max

    for value in y_ticks:
        y = y_of(value)
        shapes += [Line(left, y, right, y, _GRID), Text(left - 8, y + 4, f"{value:,}", _SMALL_SIZE, _MUTED, "end")]

    n = len(days)
    x_of: Callable[[int], float]
    stacking = list(reversed(series))  # the warmest at the bottom of the stack, the coldest on top
    if n <= BARS_UP_TO_DAYS:
        slot = (right - left) / n
        bar = min(max(1.0, slot * 0.78), _WIDEST_BAR)

        def x_of(i: int) -> float:
            return left + slot * (i + 0.5)

        for i in range(n):
            base = 0
            for name in stacking:
                value = series[name][i]
                if value:
                    bar_top = y_of(base + value)
                    shapes.append(Rect(x_of(i) - bar / 2, bar_top, bar, y_of(base) - bar_top, colours[name]))
                    base += value
    else:

        def x_of(i: int) -> float:
            return left + (right - left) * i / (n - 1)

        lower = [0] * n
        for name in stacking:
            upper = [b + v for b, v in zip(lower, series[name], strict=True)]
            if any(series[name]):
                edge = [(x_of(i), y_of(upper[i])) for i in range(n)]
                floor = [(x_of(i), y_of(lower[i])) for i in reversed(range(n))]
                shapes.append(Polygon(tuple(edge + floor), colours[name]))
            lower = upper

    shapes.append(Line(left, bottom, right, bottom, _AXIS))
    for index, label in date_ticks(days, right - left):
        x = x_of(index)
        half = text_width(label, _SMALL_SIZE) / 2
        shapes += [
            Line(x, bottom, x, bottom + 5, _AXIS),
            Text(min(max(x, _PAD + half), WIDTH - _PAD - half), bottom + 20, label, _SMALL_SIZE, _MUTED, "middle"),
        ]
    last = ", ".join(f"{name} {values[-1]:,}" for name, values in series.items())
    kind = "Stacked bars" if n <= BARS_UP_TO_DAYS else "Stacked area"
    description = f"{kind}: leads in each stage at the end of each day (UTC), {span}. On {_date(days[-1])}: {last}."
    return Chart(WIDTH, FUNNEL_HEIGHT, title, description, tuple(shapes))


def conversion_chart(rows: Sequence[ConversionBar], *, title: str) -> Chart:
    """One horizontal bar per sequence (in the order given): its conversion rate, labelled
    "converted / enrolled (rate)"; a sequence nobody enrolled in has no bar and says so."""
    subtitle = "Conversion per sequence: converted / enrolled (rate)"
    if not rows:
        return _no_data(title, subtitle, 240)
    labels = [row.label for row in rows]
    label_room = max(text_width(label, _LABEL_SIZE) for label in labels) + 8
    names_room = min(_NAME_COLUMN, max(text_width(row.sequence, _LABEL_SIZE) for row in rows))
    left = _PAD + names_room + 12
    right = WIDTH - _PAD - label_room
    step, top_percent = _nice_percent(max((row.rate or 0.0) for row in rows))
    top = 100.0
    height = int(top + _ROW * len(rows) + _PAD)
    shapes = _heading(title, subtitle)

    def x_of(rate: float) -> float:
        return left + (right - left) * min(rate * 100 / top_percent, 1.0)

    ticks = [step * k for k in range(round(top_percent / step) + 1)]
    for value in ticks:
        x = x_of(value / 100)
        shapes += [
            Line(x, top - 6, x, height - _PAD, _GRID),
            Text(x, top - 12, _percent_tick(value), _SMALL_SIZE, _MUTED, "middle"),
        ]
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        y = top + _ROW * i + (_ROW - _BAR_HEIGHT) / 2
        baseline = y + _BAR_HEIGHT / 2 + 4.5
        shapes.append(Text(_PAD, baseline, truncate(row.sequence, _LABEL_SIZE, names_room), _LABEL_SIZE))
        if row.rate is None:
            shapes.append(Text(left + 4, baseline, label, _LABEL_SIZE, _MUTED))
            continue
        end = x_of(row.rate)
        if end > left:
            shapes.append(Rect(left, y, max(end - left, 1.0), _BAR_HEIGHT, _BAR))
        shapes.append(Text(end + 8, baseline, label, _LABEL_SIZE))
    shapes.append(Line(left, top - 6, left, height - _PAD, _AXIS))
    description = "Horizontal bars: conversion per sequence. " + "; ".join(
        f"{row.sequence}: {label}" for row, label in zip(rows, labels, strict=True)
    )
    return Chart(WIDTH, height, title, description + ".", tuple(shapes))


def date_ticks(days: Sequence[date], room: float) -> list[tuple[int, str]]:
    """The dated x axis: (index in ``days``, label) at the finest round spacing whose labels fit in ``room`` px."""
    if not days:
        return []
    first, last = days[0], days[-1]
    index = {day: i for i, day in enumerate(days)}
    monday = first + timedelta(days=(7 - first.weekday()) % 7)
    candidates: list[list[tuple[date, str]]] = [[(day, _day(day)) for day in days[::every]] for every in (1, 2)]
    candidates += [[(day, _day(day)) for day in _every(monday, last, every)] for every in (7, 14)]
    for months in (1, 2, 3, 6, 12):
        starts = _month_starts(first, last, months)
        candidates.append([(day, _month(day, first=k == 0)) for k, day in enumerate(starts)])
    for ticks in candidates:
        present = [(index[day], label) for day, label in ticks if day in index]
        if len(present) < min(2, len(days)):
            continue
        if sum(text_width(label, _SMALL_SIZE) + 16 for _, label in present) <= room:
            return present
    return [(0, _date(first)), (len(days) - 1, _date(last))]


def _every(start: date, last: date, days: int) -> list[date]:
    return [start + timedelta(days=k) for k in range(0, (last - start).days + 1, days)]


def _month_starts(first: date, last: date, months: int) -> list[date]:
    year, month = first.year, first.month
    if first.day > 1:
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    starts = []
    while date(year, month, 1) <= last:
        if (month - 1) % months == 0:
            starts.append(date(year, month, 1))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return starts


def _day(day: date) -> str:
    return f"{_MONTHS[day.month - 1]} {day.day}"


def _month(day: date, *, first: bool) -> str:
    return f"{_MONTHS[day.month - 1]} {day.year}" if first or day.month == 1 else _MONTHS[day.month - 1]


def _date(day: date) -> str:
    return f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"


def _nice_scale(maximum: int, max_intervals: int = 7) -> tuple[int, int]:
    """A round step (1, 2, 2.5 or 5 × a power of ten, a whole number) and the axis top, a multiple of it
    ≥ ``maximum``: of the steps giving at most ``max_intervals`` gridlines, the one with the least headroom."""
    maximum = max(maximum, 1)
    best: tuple[int, int] | None = None
    power = 1
    while best is None or power <= maximum:
        for mantissa in (1.0, 2.0, 2.5, 5.0):
            step = mantissa * power
            if step != int(step):
                continue
            top = -(-maximum // int(step)) * int(step)
            if top // int(step) <= max_intervals and (best is None or top < best[1]):
                best = (int(step), top)
        power *= 10
    assert best is not None
    return best


_PERCENT_STEPS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 25.0)


def _nice_percent(max_rate: float) -> tuple[float, float]:
    """A round step in percent and the axis top (at most 100%) for rates up to ``max_rate``."""
    value = max_rate * 100
    for step in _PERCENT_STEPS:
        count = max(1, math.ceil(value / step - 1e-9))
        if count <= 5:
            return step, min(100.0, count * step)
    return 25.0, 100.0


def _percent_tick(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") + "%"


def _colours(series: Mapping[str, object]) -> dict[str, str]:
    spare = iter(_SPARE_COLOURS * (len(series) // len(_SPARE_COLOURS) + 1))
    return {name: STAGE_COLOURS.get(name) or next(spare) for name in series}


def _heading(title: str, subtitle: str) -> list[Shape]:
    return [
        Text(_PAD, 38, truncate(title, _TITLE_SIZE, WIDTH - 2 * _PAD), _TITLE_SIZE),
        Text(_PAD, 60, truncate(subtitle, _LABEL_SIZE, WIDTH - 2 * _PAD), _LABEL_SIZE, _MUTED),
    ]


def _no_data(title: str, subtitle: str, height: int) -> Chart:
    """A chart with its title and a framed "no data yet", rather than empty axes."""
    top = 80.0
    shapes = [
        *_heading(title, subtitle),
        Rect(_PAD, top, WIDTH - 2 * _PAD, height - top - _PAD, "#f3f4f6"),
        Text(WIDTH / 2, (top + height - _PAD) / 2 + 6, NO_DATA, 16, _MUTED, "middle"),
    ]
    return Chart(WIDTH, height, title, f"{subtitle}: {NO_DATA}.", tuple(shapes))


def report_charts(
    days: Sequence[date],
    stages: Mapping[str, Sequence[int]],
    conversions: Sequence[ConversionBar],
    *,
    period: str,
    window: str,
) -> tuple[Chart, Chart]:
    """The report's two pictures for one period (``period``, ``window``: as people say them)."""
    funnel = funnel_chart(days, stages, title=f"Leads by stage, {period}")
    conversion = conversion_chart(
        conversions, title=f"Conversion per sequence, enrollments of {period} (within {window})"
    )
    return funnel, conversion
