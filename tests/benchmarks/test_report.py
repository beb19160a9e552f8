"""The report benchmark measures a correct report: its counts equal counts made by hand from the rows it wrote."""

from __future__ import annotations

import sys
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from benchmarks import report as bench
from db.analytics import Period, sequence_conversions, step_counts
from db.engine import get_engine, session_scope
from db.models import Enrollment, Event, Lead, Message, StageTransition, Suppression
from nurture.playbook import Stage
from nurture.reporting import COUNTS
from tests.conftest import postgres_url

MESSAGES, EVENTS = 3000, 15_000
GOALS = {"welcome": ("demo_request",), "demo_offer": ("purchase",)}
RANK = {stage.value: rank for rank, stage in enumerate(Stage)}


def _rows(url: str, model: Any) -> list[Any]:
    with session_scope(get_engine(url), commit=False) as session:
        return list(session.execute(select(model.__table__)))


def by_hand(url: str, period: Period, window: timedelta) -> dict[tuple[str, str, str | None], dict[str, int]]:
    """Every count of the report, one email at a time, from the rows as written."""
    messages = [m for m in _rows(url, Message) if m.sent_at is not None and period.since <= m.sent_at <= period.until]
    events: dict[int, set[str]] = defaultdict(set)
    did: dict[int, list[tuple[str, datetime]]] = defaultdict(list)  # each lead's events: its goals
    for e in _rows(url, Event):
        if e.message_id is not None and (e.occurred_at >= period.since or e.kind == "unsubscribe"):
            events[e.message_id].add(e.kind)
        did[e.lead_id].append((e.kind, e.occurred_at))
    enrollments = {n.id: n for n in _rows(url, Enrollment)}
    moves: dict[int, list[tuple[str, datetime]]] = defaultdict(list)
    for t in _rows(url, StageTransition):
        moves[t.lead_id].append((t.to_stage, t.at))
    emails = {lead.email: lead.id for lead in _rows(url, Lead)}
    # A page unsubscribe: the last of the period's emails the lead got before it.
    credited = set()
    for s in _rows(url, Suppression):
        if s.reason == "unsubscribe" and s.source in ("link", "expired link") and s.at >= period.since:
            before = [m for m in messages if m.lead_id == emails[s.email] and m.sent_at <= s.at]
            if before:
                credited.add(max(before, key=lambda m: m.sent_at).id)
    counts: dict[tuple[str, str, str | None], dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTS, 0))
    for m in messages:
        kinds = events[m.id]
        enrollment = enrollments[m.enrollment_id]
        goal = any(
            kind in GOALS.get(m.sequence, ()) and m.sent_at < at <= m.sent_at + window and at >= period.since
            for kind, at in did[m.lead_id]
        )
        moved = m.sequence not in GOALS and any(
            to in ("hot", "customer")
            and m.sent_at < at <= m.sent_at + window
            and at >= period.since
            and RANK[to] > RANK[enrollment.stage]
            for to, at in moves[m.lead_id]
        )
        bounced = "bounce" in kinds or (m.status == "failed" and (m.last_error or "").startswith("bounce:"))
        row = counts[(m.sequence, m.step_id, m.variant)]
        for name, happened in (
            ("sent", True),
            ("delivered", m.delivered_at is not None),
            ("opened", "email_open" in kinds),
            ("machine_opened", "email_machine_open" in kinds),
            ("clicked", "email_click" in kinds),
            ("bounced", bounced),
            ("unsubscribed", "unsubscribe" in kinds or m.id in credited),
            ("spam", "spamreport" in kinds),
            ("converted", goal or moved),
        ):
            row[name] += int(happened)
    return dict(counts)


@pytest.mark.parametrize("days", [30, 95])
def test_the_report_on_the_generated_history_equals_counts_made_by_hand(database_url: str, days: int) -> None:
    written = bench.write_history(database_url, messages=MESSAGES, events=EVENTS, seed=5)
    assert written.events == EVENTS
    assert MESSAGES <= written.messages < MESSAGES + 10  # the last lead's emails, whole
    period = Period(bench.NOW - timedelta(days=days), bench.NOW)

    expected = by_hand(database_url, period, bench.WINDOW)
    with session_scope(get_engine(database_url), commit=False) as session:
        rows = step_counts(session=session, period=period, conversion_window=bench.WINDOW, goals=GOALS)
    got = {(r.sequence, r.step, r.variant): {name: getattr(r, name) for name in COUNTS} for r in rows}

    assert got == expected
    # Every count is exercised (over the whole history: spam reports are rare): a count the history
    # never produces could not show a wrong report.
    totals = {name: sum(row[name] for row in expected.values()) for name in COUNTS}
    assert all(totals.values()) if days == 95 else totals["unsubscribed"] and totals["converted"], totals
    assert {variant for (_, step, variant) in got if step == "welcome"} == {"a", "b"}


def test_conversions_per_sequence_equal_enrollments_counted_by_hand(database_url: str) -> None:
    bench.write_history(database_url, messages=MESSAGES, events=EVENTS, seed=5)
    period = Period(bench.NOW - timedelta(days=30), bench.NOW)
    window = bench.WINDOW
    moves: dict[int, list[tuple[str, datetime]]] = defaultdict(list)
    for t in _rows(database_url, StageTransition):
        moves[t.lead_id].append((t.to_stage, t.at))
    did: dict[int, list[tuple[str, datetime]]] = defaultdict(list)
    for e in _rows(database_url, Event):
        did[e.lead_id].append((e.kind, e.occurred_at))
    expected: dict[str, list[int]] = {}
    for n in _rows(database_url, Enrollment):
        if not period.since <= n.started_at <= period.until:
            continue
        goal = any(
            kind in GOALS.get(n.sequence, ()) and n.started_at < at <= n.started_at + window
            for kind, at in did[n.lead_id]
        )
        moved = n.sequence not in GOALS and any(
            to in ("hot", "customer") and n.started_at < at <= n.started_at + window and RANK[to] > RANK[n.stage]
            for to, at in moves[n.lead_id]
        )
        counted = expected.setdefault(n.sequence, [0, 0])
        counted[0] += 1
        counted[1] += int(goal or moved)
    with session_scope(get_engine(database_url), commit=False) as session:
        rows = sequence_conversions(session=session, period=period, window=window, goals=GOALS)
    assert {r.sequence: [r.enrolled, r.converted] for r in rows} == expected
    assert sum(converted for _, converted in expected.values()) > 0


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_the_script_runs_and_prints_its_ratios(
    engine: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if engine == "postgresql" and postgres_url() is None:
        pytest.skip("NURTURE_TEST_DATABASE_URL is not set: PostgreSQL tests skipped (CI sets it)")
    monkeypatch.setattr(sys, "argv", ["benchmarks.report", "--messages", "400", "--engine", engine])
    bench.main()
    out = capsys.readouterr().out
    for said in ("report, 90 days", "report, 30 days, --sequence welcome", "sequence_conversions", "30 days / 1 day"):
        assert said in out
    assert "x baseline" in out
    assert f"summary (seconds, best of 3; ratio to the bare read of the same period)\n  {engine}" in out
