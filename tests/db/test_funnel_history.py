"""The funnel over time from stored transitions, against a lead-by-lead, day-by-day reference (both engines)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import pytest
from sqlalchemy import Engine

from db.engine import session_scope
from db.funnel_history import stages_by_day
from db.models import Lead, StageTransition

STAGES = ["cold", "warm", "hot", "customer"]
DAY0 = date(2026, 3, 1)


@dataclass
class StoredLead:
    created_at: datetime
    stage: str
    transitions: list[tuple[datetime, str, str]]  # (at, from, to)


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def generated_history(seed: int, leads: int = 60) -> list[StoredLead]:
    """Leads created over three weeks, warming, cooling and buying at random times; some exactly at
    midnight or a microsecond before it, some created or moved outside the range asked for."""
    rng = random.Random(seed)
    history = []
    for _ in range(leads):
        day = DAY0 + timedelta(days=rng.randint(-3, 22))
        created = rng.choice(
            [
                midnight(day),
                midnight(day) - timedelta(microseconds=1),
                midnight(day) + timedelta(seconds=rng.randint(0, 86_399), microseconds=rng.randint(0, 999_999)),
            ]
        )
        stage, at, moves = "cold", created, []
        for _ in range(rng.choice([0, 0, 1, 2, 3, 5])):
            if stage == "customer":
                break
            at += rng.choice([timedelta(microseconds=1), timedelta(hours=rng.randint(1, 90))])
            if rng.random() < 0.2:
                at = midnight(at.date() + timedelta(days=1))  # right at the start of a day
            target = rng.choice([s for s in STAGES if s != stage])
            moves.append((at, stage, target))
            stage = target
        history.append(StoredLead(created, stage, moves))
    return history


def store(engine: Engine, history: list[StoredLead]) -> None:
    with session_scope(engine) as session:
        rows = [
            Lead(email=f"lead{i}@example.com", created_at=h.created_at, updated_at=h.created_at, stage=h.stage)
            for i, h in enumerate(history)
        ]
        session.add_all(rows)
        session.flush()
        session.add_all(
            StageTransition(
                lead_id=row.id, from_stage=old, to_stage=new, at=at, score=0.0, reason="test", playbook_version="v"
            )
            for row, h in zip(rows, history, strict=True)
            for at, old, new in h.transitions
        )


def reference(history: list[StoredLead], start: date, end: date) -> dict[str, list[int]]:
    """Each lead looked at on each day: the target of its last transition before the day ended."""
    counts: dict[str, list[int]] = {s: [] for s in STAGES}
    for k in range((end - start).days + 1):
        day_end = midnight(start + timedelta(days=k + 1))
        today = dict.fromkeys(STAGES, 0)
        for lead in history:
            if lead.created_at >= day_end:
                continue
            done = [to for at, _, to in lead.transitions if at < day_end]
            today[done[-1] if done else (lead.transitions[0][1] if lead.transitions else lead.stage)] += 1
        for stage in STAGES:
            counts[stage].append(today[stage])
    return counts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stages_by_day_matches_a_lead_by_lead_reference(engine: Engine, seed: int) -> None:
    history = generated_history(seed)
    store(engine, history)
    with session_scope(engine, commit=False) as session:
        for start, end in [(DAY0, DAY0 + timedelta(days=20)), (DAY0 + timedelta(days=5), DAY0 + timedelta(days=5))]:
            days, stages = stages_by_day(session=session, start=start, end=end)
            assert days == [start + timedelta(days=k) for k in range((end - start).days + 1)]
            assert list(stages) == STAGES
            assert stages == reference(history, start, end), (start, end)
    # Not a trivial history: leads before the range, moves at midnight, and every stage reached.
    assert any(lead.created_at < midnight(DAY0) for lead in history)
    assert any(at.time() == time() for lead in history for at, _, _ in lead.transitions)
    assert {to for lead in history for _, _, to in lead.transitions} == {"cold", "warm", "hot", "customer"}


def test_a_lead_counts_from_the_day_it_was_created_until_its_first_transition(engine: Engine) -> None:
    created = datetime(2026, 3, 2, 23, 59, 59, 999_999, tzinfo=UTC)  # the last microsecond of Mar 2
    history = [
        StoredLead(created, "hot", [(datetime(2026, 3, 4, 0, 0, tzinfo=UTC), "cold", "hot")]),
        StoredLead(datetime(2026, 3, 3, tzinfo=UTC), "cold", []),  # the first instant of Mar 3
    ]
    store(engine, history)
    with session_scope(engine, commit=False) as session:
        days, stages = stages_by_day(session=session, start=date(2026, 3, 1), end=date(2026, 3, 5))
    assert days[0] == date(2026, 3, 1)
    assert stages["cold"] == [0, 1, 2, 1, 1]  # the move at midnight counts on Mar 4
    assert stages["hot"] == [0, 0, 0, 1, 1]
    assert stages["warm"] == stages["customer"] == [0, 0, 0, 0, 0]


def test_an_empty_database_and_a_backwards_range(engine: Engine) -> None:
    with session_scope(engine, commit=False) as session:
        days, stages = stages_by_day(session=session, start=DAY0, end=DAY0 + timedelta(days=2))
        assert len(days) == 3
        assert stages == {s: [0, 0, 0] for s in STAGES}
        with pytest.raises(ValueError, match="ends"):
            stages_by_day(session=session, start=DAY0, end=DAY0 - timedelta(days=1))


def test_a_transition_whose_from_stage_disagrees_still_moves_the_lead_out_of_where_it_was(engine: Engine) -> None:
    at = datetime(2026, 3, 2, 10, tzinfo=UTC)
    # The second row says cold → hot, but the lead was warm by then: it leaves warm, never counted twice.
    moves = [(at + timedelta(hours=1), "cold", "warm"), (at + timedelta(days=1), "cold", "hot")]
    store(engine, [StoredLead(at, "hot", moves)])
    with session_scope(engine, commit=False) as session:
        _, stages = stages_by_day(session=session, start=date(2026, 3, 2), end=date(2026, 3, 3))
    assert stages == {"cold": [0, 0], "warm": [1, 0], "hot": [0, 1], "customer": [0, 0]}


def test_the_last_day_ends_at_midnight_utc(engine: Engine) -> None:
    end_of_range = datetime(2026, 3, 3, tzinfo=UTC)
    history = [
        StoredLead(end_of_range - timedelta(days=1), "warm", [(end_of_range, "cold", "warm")]),
        StoredLead(end_of_range, "cold", []),
        StoredLead(end_of_range - timedelta(microseconds=1), "cold", []),
    ]
    store(engine, history)
    with session_scope(engine, commit=False) as session:
        _, stages = stages_by_day(session=session, start=date(2026, 3, 2), end=date(2026, 3, 2))
    assert stages == {"cold": [2], "warm": [0], "hot": [0], "customer": [0]}
