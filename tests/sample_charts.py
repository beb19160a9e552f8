"""Made-up but realistic report data, and the sample charts in docs/img drawn from it.

Regenerate the pictures in docs/reports.md with ``python -m tests.sample_charts docs/img``.
The funnel is a seeded day-by-day simulation of a B2B list: leads arrive (fewer at
weekends), warm up, get hot, buy, and some cool down again; the conversion rows are the
shipped playbook's sequences with plausible rates.
"""

from __future__ import annotations

import random
import sys
from datetime import date, timedelta
from pathlib import Path

from nurture.chart_drawing import Chart
from nurture.charts import ConversionBar, conversion_chart, funnel_chart

FIRST_DAY = date(2026, 8, 31)


def sample_funnel_data(days: int = 90, *, seed: int = 7) -> tuple[list[date], dict[str, list[int]]]:
    """Leads per stage at the end of each of ``days`` days."""
    rng = random.Random(seed)

    def some(n: int, rate: float) -> int:
        return sum(rng.random() < rate for _ in range(n))

    cold, warm, hot, customer = 1800, 240, 45, 20
    dates = [FIRST_DAY + timedelta(days=k) for k in range(days)]
    stages: dict[str, list[int]] = {"cold": [], "warm": [], "hot": [], "customer": []}
    for day in dates:
        weekend = day.weekday() >= 5
        arrived = rng.randint(8, 20) if weekend else rng.randint(35, 75)
        warmed, cooled = some(cold, 0.012), some(warm, 0.02)
        heated, back = some(warm, 0.03), some(hot, 0.04)
        bought = some(hot, 0.015 if weekend else 0.035)
        cold += arrived - warmed + cooled
        warm += warmed - cooled - heated + back
        hot += heated - back - bought
        customer += bought
        for name, value in zip(stages, (cold, warm, hot, customer), strict=True):
            stages[name].append(value)
    return dates, stages


def sample_conversion_rows() -> list[ConversionBar]:
    """The shipped playbook's sequences, enrolled and converted over a quarter."""
    return [
        ConversionBar("welcome", enrolled=1_274, converted=131),
        ConversionBar("still_evaluating", enrolled=486, converted=29),
        ConversionBar("demo_offer", enrolled=352, converted=61),
        ConversionBar("win_back", enrolled=219, converted=7),
        ConversionBar("onboarding", enrolled=0, converted=0),
    ]


def sample_charts() -> tuple[Chart, Chart]:
    dates, stages = sample_funnel_data()
    return (
        funnel_chart(dates, stages, title="Leads by stage, last 90 days"),
        conversion_chart(sample_conversion_rows(), title="Conversion per sequence, last 90 days"),
    )


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, chart in zip(("funnel", "conversion"), sample_charts(), strict=True):
        (out / f"{name}.svg").write_text(chart.svg())
        (out / f"{name}.png").write_bytes(chart.png())
        print(f"wrote {out / name}.svg and .png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img"))
