"""The report's shape: playbook order, rates, verdicts judged on what each step chose, 80 columns."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from rich.console import Console

from nurture.playbook import Playbook
from nurture.report_text import render, report_csv
from nurture.reporting import StepCounts, build_report, describe_duration, report_json


def _welcome(variant: str, sent: int, opened: int, clicked: int) -> StepCounts:
    return StepCounts("welcome", "welcome", variant, sent=sent, delivered=sent, opened=opened, clicked=clicked)


ROWS = [
    StepCounts("demo_offer", "demo_offer", None, sent=40, delivered=38, opened=20, clicked=5, converted=4),
    StepCounts("welcome", "case_study", None, sent=10, delivered=0, opened=4),
    StepCounts("welcome", "old_intro", None, sent=7, delivered=7),  # a step since removed
    _welcome("b", 400, 220, 60),
    _welcome("a", 400, 150, 58),
]


def test_sequences_steps_and_variants_read_in_playbook_order(playbook: Playbook) -> None:
    report = build_report(ROWS, playbook=playbook)
    order = [s.sequence for s in report.sequences]
    assert order == [name for name in playbook.sequences if name in order]
    welcome = report.sequences[order.index("welcome")]
    assert [(s.step, s.in_playbook) for s in welcome.steps] == [
        ("welcome", True),
        ("case_study", True),
        ("old_intro", False),
    ]
    split = welcome.steps[0]
    assert [v.variant for v in split.variants] == ["a", "b"]  # the control first
    assert (split.total.sent, split.total.opened) == (800, 370)
    assert welcome.total.sent == 817


def test_rates_are_per_delivered_email_else_per_sent(playbook: Playbook) -> None:
    rows = {(r["sequence"], r["step"], r["variant"]): r for r in build_report(ROWS, playbook=playbook).rows()}
    assert rows[("demo_offer", "demo_offer", "")]["converted_rate"] == round(4 / 38, 4)
    assert rows[("welcome", "case_study", "")]["opened_rate"] == 0.4  # no delivery reports: per sent


def test_a_split_test_is_judged_on_what_its_step_chose(playbook: Playbook) -> None:
    """The shipped welcome test is a subject line, judged on opens: b's extra opens win, though
    clicks are level. Asked to judge on clicks, there is no clear difference."""
    welcome = playbook.sequences["welcome"].steps[0]
    assert welcome.split_metric.value == "opened"
    judged = build_report(ROWS, playbook=playbook)
    verdict = next(s for s in judged.sequences if s.sequence == "welcome").steps[0].verdict
    assert verdict is not None
    assert (verdict.metric, verdict.winner) == ("opened", "b")
    on_clicks = build_report(ROWS, playbook=playbook, metric="clicked")
    verdict = next(s for s in on_clicks.sequences if s.sequence == "welcome").steps[0].verdict
    assert verdict is not None
    assert (verdict.metric, verdict.winner) == ("clicked", None)
    with pytest.raises(ValueError, match="one of opened, clicked, converted"):
        build_report(ROWS, playbook=playbook, metric="clicks")


def test_without_a_playbook_the_report_still_reads(playbook: Playbook) -> None:
    report = build_report(ROWS, playbook=None)
    assert [s.sequence for s in report.sequences] == ["demo_offer", "welcome"]
    assert all(not s.in_playbook for s in report.sequences)
    verdict = report.sequences[1].steps[-1].verdict  # a split step, judged on clicks by default
    assert verdict is not None
    assert verdict.metric == "clicked"


def test_text_fits_80_columns_and_csv_and_json_carry_every_count(playbook: Playbook) -> None:
    report = build_report(ROWS, playbook=playbook, period={"since": "2026-10-01", "until": "2026-11-01"})
    console = Console(width=80, record=True, color_system=None)
    for part in render(report):
        console.print(part)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "welcome/welcome: b beats a on opened" in " ".join(text.split())
    assert "old_intro (removed)" in text
    parsed = list(csv.DictReader(io.StringIO(report_csv(report))))
    assert len(parsed) == len(report.rows()) == 6
    split = [row for row in parsed if row["step"] == "welcome"]
    assert [(row["variant"], bool(row["verdict"])) for row in split] == [("(all)", True), ("a", False), ("b", False)]
    data = report_json(report)
    step = data["sequences"][[s["sequence"] for s in data["sequences"]].index("welcome")]["steps"][0]
    assert step["verdict"]["winner"] == "b"
    assert [v["variant"] for v in step["variants"]] == ["a", "b"]
    assert step["variants"][1]["rates"]["opened"] == 0.55


def test_a_window_reads_as_people_say_it() -> None:
    assert [describe_duration(timedelta(hours=h)) for h in (336, 24, 36)] == ["14 days", "1 day", "36 hours"]
