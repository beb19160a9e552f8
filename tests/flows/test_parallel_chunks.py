"""Chunks of leads advanced side by side: disjoint ranges, the same result as one at a time, a failure kept apart.

The range splitter on both engines; the cycle flow under the session's Prefect test
server with two chunk threads on PostgreSQL, against the same cycle one chunk at a time.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session
from sqlmodel import col

import flows.chunks
from db.chunks import LeadRange, candidate_ranges, candidates_in_range, lead_ranges, leads_in_range
from db.cycle import candidate_ids
from db.engine import get_engine, session_scope, upgrade_schema
from db.imports import add_events, upsert_leads
from db.models import Enrollment, Event, Lead, ScoreChange, StageTransition
from flows.cycle import nurture_cycle
from flows.runtime import reset_runtime
from nurture.population import generate_population
from nurture.settings import Settings
from tests.conftest import T0, postgres_url

NOW = T0 + timedelta(days=20)


def _populate(engine: Engine, leads: int = 300) -> None:
    population = generate_population(leads=leads, start=T0, end=NOW, seed=11)
    with session_scope(engine) as session:
        upsert_leads(session=session, records=population.leads, now=T0)
        add_events(session=session, records=population.events, now=T0)


def test_chunk_concurrency_is_two_on_postgresql_and_one_on_sqlite() -> None:
    postgres = "postgresql+psycopg://nurture@db/nurture"
    assert Settings(nurture_database_url=postgres).chunk_concurrency == 2
    assert Settings(nurture_database_url=postgres, nurture_chunk_concurrency=8).chunk_concurrency == 8
    # SQLite's writers take turns: more threads would only wait for each other's lock.
    assert Settings(nurture_database_url="sqlite:///n.db", nurture_chunk_concurrency=8).chunk_concurrency == 1
    for out_of_bounds in (0, 17):
        with pytest.raises(ValueError, match="nurture_chunk_concurrency"):
            Settings(nurture_database_url=postgres, nurture_chunk_concurrency=out_of_bounds)


def _check_cut(ranges: list[LeadRange], ids: list[int], size: int, in_range: Any) -> None:
    assert len(ranges) == -(-len(ids) // size)
    assert all(r.lo <= r.hi and 0 < r.leads <= size for r in ranges)
    assert all(a.hi < b.lo for a, b in itertools.pairwise(ranges))  # in order, never overlapping
    covered = [i for r in ranges for i in in_range(r)]
    assert covered == sorted(ids)  # every one exactly once
    assert [len(in_range(r)) for r in ranges] == [r.leads for r in ranges]


def test_ranges_are_disjoint_and_cover_every_candidate_once(engine: Engine) -> None:
    _populate(engine, leads=230)
    with session_scope(engine) as session:
        # A few leads with nothing to do: the candidates have gaps between their ids.
        session.execute(
            Event.__table__.update().where(col(Event.lead_id) % 7 == 0).values(applied=True)  # type: ignore[attr-defined]
        )
        session.execute(Lead.__table__.update().where(col(Lead.id) % 7 == 0).values(needs_rescore=False))  # type: ignore[attr-defined]
    with session_scope(engine) as session:
        candidates = [int(i) for i in session.scalars(select(candidate_ids(NOW).c.id))]
        everyone = [int(i) for i in session.scalars(select(col(Lead.id)))]
        assert 0 < len(candidates) < len(everyone)
        for size in (1, 7, 50, 1000):
            _check_cut(
                candidate_ranges(session=session, now=NOW, size=size),
                candidates,
                size,
                lambda r, s=session: candidates_in_range(session=s, now=NOW, lo=r.lo, hi=r.hi),
            )
            _check_cut(
                lead_ranges(session=session, size=size),
                everyone,
                size,
                lambda r, s=session: leads_in_range(session=s, lo=r.lo, hi=r.hi),
            )
        with pytest.raises(ValueError, match="at least one lead"):
            lead_ranges(session=session, size=0)


def _outcome(engine: Engine) -> dict[str, Any]:
    """What a cycle left in the database, by lead address (ids are the same in both databases)."""
    with Session(engine) as session:
        leads = session.execute(
            select(Lead.id, Lead.stage, Lead.score, Lead.engagement, Lead.next_review_at).order_by(Lead.id)
        ).all()
        transitions = session.execute(
            select(StageTransition.lead_id, StageTransition.from_stage, StageTransition.to_stage, StageTransition.at)
        ).all()
        enrollments = session.execute(select(Enrollment.lead_id, Enrollment.sequence, Enrollment.state)).all()
        ledger = session.execute(select(ScoreChange.lead_id, ScoreChange.new_score)).all()
        pending = session.scalar(select(Event.id).where(col(Event.applied).is_(False), col(Event.occurred_at) <= NOW))
    return {
        "leads": [
            (i, stage, round(score, 9), round(engagement, 9), review) for i, stage, score, engagement, review in leads
        ],
        "transitions": sorted(transitions),
        "enrollments": sorted(enrollments),
        "ledger": sorted((i, round(s, 9)) for i, s in ledger),
        "pending": pending,
    }


@pytest.fixture
def two_postgres_schemas() -> Iterator[tuple[str, str]]:
    base = postgres_url()
    if base is None:
        pytest.skip("NURTURE_TEST_DATABASE_URL is not set: PostgreSQL tests skipped (CI sets it)")
    schemas = [f"nurture_test_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    admin = create_engine(base)
    with admin.begin() as conn:
        for schema in schemas:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    separator = "&" if "?" in base else "?"
    urls = [f"{base}{separator}options=-csearch_path%3D{schema}" for schema in schemas]
    try:
        yield urls[0], urls[1]
    finally:
        for url in urls:
            get_engine(url).dispose()
        get_engine.cache_clear()
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _cycle_with(url: str, concurrency: int, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any]]:
    """A cycle over the population, ``concurrency`` chunks at a time; its summary and what it left."""
    monkeypatch.setenv("NURTURE_DATABASE_URL", url)
    monkeypatch.setenv("NURTURE_CHUNK_CONCURRENCY", str(concurrency))
    reset_runtime()
    engine = get_engine(url)
    upgrade_schema(engine)
    _populate(engine)
    if concurrency > 1:
        with session_scope(engine) as session:
            second = candidate_ranges(session=session, now=NOW, size=50)[1]
        # The first two chunks wait for each other: they finish only if they run at the same time.
        both = threading.Barrier(2, timeout=60)
        advance = flows.chunks.advance_leads

        def side_by_side(**kwargs: Any) -> Any:
            if min(kwargs["lead_ids"]) <= second.hi:
                both.wait()
            return advance(**kwargs)

        monkeypatch.setattr(flows.chunks, "advance_leads", side_by_side)
    summary = nurture_cycle(now=NOW, batch_size=50, dispatch=False)
    assert summary["chunks"] == 6
    assert summary["chunks_failed"] == []
    assert summary["leads_advanced"] == 300
    return summary, _outcome(engine)


@pytest.mark.postgres
def test_two_chunks_at_a_time_do_what_one_at_a_time_does(
    prefect_api: str,
    nurture_env: dict[str, str],
    two_postgres_schemas: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcomes = [
        _cycle_with(url, concurrency, monkeypatch)
        for url, concurrency in zip(two_postgres_schemas, (1, 2), strict=True)
    ]
    (one, one_db), (two, two_db) = outcomes
    assert one_db["pending"] is None
    assert sum(one["transitions"].values()) > 0
    assert two_db == one_db
    for key in ("score_changes", "transitions", "enrollments", "funnel"):
        assert two[key] == one[key], key


def test_a_failed_chunk_keeps_the_others_and_fails_the_run(
    prefect_api: str, nurture_env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NURTURE_DATABASE_URL", database_url)
    reset_runtime()
    engine = get_engine(database_url)
    upgrade_schema(engine)
    _populate(engine)
    with session_scope(engine) as session:
        ranges = candidate_ranges(session=session, now=NOW, size=50)
    broken = ranges[2]
    advance = flows.chunks.advance_leads
    calls: list[int] = []

    def fails_on_one_range(**kwargs: Any) -> Any:
        result = advance(**kwargs)  # its writes are in the chunk's transaction, rolled back by the raise
        if min(kwargs["lead_ids"]) == broken.lo:
            calls.append(broken.lo)
            raise RuntimeError("the database went away")
        return result

    monkeypatch.setattr(flows.chunks, "advance_leads", fails_on_one_range)
    monkeypatch.setattr(
        flows.chunks, "advance_chunk_task", flows.chunks.advance_chunk_task.with_options(retry_delay_seconds=0)
    )
    state = nurture_cycle(now=NOW, batch_size=50, dispatch=False, return_state=True)

    assert state.is_failed()
    assert len(calls) == 3  # tried, then retried twice
    assert state.message is not None
    assert f"chunk 3/6 (leads {broken.lo}–{broken.hi})" in state.message
    summary = state.result(raise_on_failure=False)
    assert summary["chunks_failed"] == [f"chunk 3/6 (leads {broken.lo}–{broken.hi})"]
    assert summary["leads_advanced"] == 300 - broken.leads
    with session_scope(engine) as session:
        still_pending = {
            int(i)
            for i in session.scalars(
                select(Event.lead_id).where(col(Event.applied).is_(False), col(Event.occurred_at) <= NOW)
            )
        }
        scored = set(session.scalars(select(ScoreChange.lead_id)))
    assert still_pending
    assert all(broken.lo <= i <= broken.hi for i in still_pending)
    assert not any(broken.lo <= i <= broken.hi for i in scored)
    assert len(scored) > 200

    monkeypatch.setattr(flows.chunks, "advance_leads", advance)
    again = nurture_cycle(now=NOW, batch_size=50, dispatch=False)
    assert again["leads_advanced"] == broken.leads  # the next cycle takes the failed chunk's leads up
    assert again["chunks_failed"] == []
