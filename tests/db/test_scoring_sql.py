"""The engagement scoring compiled to SQL agrees with the reference in nurture.scoring, on SQLite and PostgreSQL.

Hypothesis generates scoring rules (points, daily caps, half-lives) and leads' events
(kinds, times down to the microsecond, several on one day, ties), writes them to a
real database, and checks every lead's points per kind to 1e-9.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.models import Event, Lead
from db.scoring import chunk_points
from nurture.playbook import EventRule, Playbook, Scoring
from nurture.scoring import ActivityEvent, event_points
from tests.conftest import T0

KINDS = ["page_view", "pricing_view", "email_click", "demo_request", "purchase", "unscored_thing"]
NOW = T0 + timedelta(days=200)

rules = st.builds(
    EventRule,
    points=st.floats(min_value=-50, max_value=100, allow_nan=False, allow_infinity=False).filter(
        lambda p: p == 0 or abs(p) >= 1e-6  # the playbook refuses smaller
    ),
    max_per_day=st.one_of(st.none(), st.integers(min_value=1, max_value=4)),
)
scorings = st.builds(
    lambda half_life_hours, events: (half_life_hours, events),
    st.integers(min_value=1, max_value=24 * 120),
    st.dictionaries(st.sampled_from(KINDS[:-1]), rules, min_size=1, max_size=5),
)
# Times clustered on a few days (caps bite), some exactly equal (ties), microseconds included.
moments = st.builds(
    lambda day, second, micro: T0 + timedelta(days=day, seconds=second, microseconds=micro),
    st.sampled_from([0, 1, 199]) | st.integers(min_value=0, max_value=199),
    st.sampled_from([0, 1, 3600, 7 * 3600 + 5, 86399]) | st.integers(min_value=0, max_value=86399),
    st.sampled_from([0, 1, 999_999]) | st.integers(min_value=0, max_value=999_999),
)
# Bursts: a kind repeated up to 6 times within minutes (a daily cap then bites, or a burst crosses midnight).
bursts = st.builds(
    lambda kind, at, repeat, spacing: [(kind, at + timedelta(seconds=spacing * n)) for n in range(repeat)],
    st.sampled_from(KINDS),
    moments,
    st.integers(min_value=1, max_value=6),
    st.sampled_from([0, 1, 90]),
)
lead_events = st.lists(
    st.lists(bursts, max_size=6).map(lambda groups: [event for group in groups for event in group]),
    min_size=1,
    max_size=5,
)


def _playbook(base: Playbook, half_life_hours: int, events: dict[str, EventRule]) -> Playbook:
    scoring = Scoring(half_life=timedelta(hours=half_life_hours), events=events, fit=base.scoring.fit)
    return base.model_copy(update={"scoring": scoring})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scoring=scorings, leads=lead_events, future=st.booleans())
def test_sql_points_agree_with_the_reference_to_1e_9(
    engine: Engine,
    playbook: Playbook,
    scoring: tuple[int, dict[str, EventRule]],
    leads: list[list[tuple[str, datetime]]],
    future: bool,
) -> None:
    rules_playbook = _playbook(playbook, *scoring)
    with session_scope(engine) as session:
        session.execute(delete(Event))
        session.execute(delete(Lead))
        ids = []
        for n, _ in enumerate(leads):
            lead = Lead(email=f"lead{n}@example.com", created_at=T0, updated_at=T0)
            session.add(lead)
            session.flush()
            assert lead.id is not None
            ids.append(lead.id)
        rows = [
            {"lead_id": lead_id, "kind": kind, "occurred_at": at, "received_at": T0, "properties": {}}
            for lead_id, events in zip(ids, leads, strict=True)
            for kind, at in events
        ]
        # An event after `now` is not counted yet.
        if future:
            rows.append(
                {
                    "lead_id": ids[0],
                    "kind": "purchase",
                    "occurred_at": NOW + timedelta(microseconds=1),
                    "received_at": T0,
                    "properties": {},
                }
            )
        if rows:
            session.execute(insert(Event), rows)
    with session_scope(engine) as session:
        found = chunk_points(session=session, lead_ids=ids, playbook=rules_playbook, now=NOW)
        every_other = chunk_points(session=session, lead_ids=ids[::2], playbook=rules_playbook, now=NOW)
    got = {(p.lead_id, p.kind): p for p in found}
    # Asked for some leads of a range: only theirs, the same as when asked for all.
    assert [p for p in found if p.lead_id in ids[::2]] == every_other
    for lead_id, all_events in zip(ids, leads, strict=True):
        events = [(kind, at) for kind, at in all_events if at <= NOW]  # later ones are not due yet
        reference = event_points([ActivityEvent(k, t) for k, t in events], rules_playbook.scoring, NOW)
        for kind, points in reference.by_kind.items():
            assert got[(lead_id, kind)].points == pytest.approx(points, abs=1e-9, rel=0)
        counted_kinds = set(rules_playbook.scoring.events) | set(rules_playbook.stages.customer.on_events)
        expected_counts = {k: sum(1 for kind, _ in events if kind == k) for k in counted_kinds}
        for kind, n in expected_counts.items():
            row = got.get((lead_id, kind))
            assert (row.events if row else 0) == n
            if kind not in reference.by_kind and row is not None:
                assert row.points == pytest.approx(0.0, abs=1e-9)


def _only_lead(session: Session) -> int:
    """An empty database but for one lead; its id."""
    session.execute(delete(Event))
    session.execute(delete(Lead))
    lead = Lead(email="ann@example.com", created_at=T0, updated_at=T0)
    session.add(lead)
    session.flush()
    assert lead.id is not None
    return lead.id


def test_decay_is_exact_to_the_microsecond(engine: Engine, playbook: Playbook) -> None:
    """One event 14 days and 1 µs before now, half-life 14 days: half its points, to 1e-12."""
    one = _playbook(playbook, 14 * 24, {"demo_request": EventRule(points=30)})
    at = datetime(2026, 3, 2, 9, 0, 0, 1, tzinfo=UTC)
    with session_scope(engine) as session:
        lead_id = _only_lead(session)
        session.add(Event(lead_id=lead_id, kind="demo_request", occurred_at=at, received_at=T0))
    with session_scope(engine) as session:
        [row] = chunk_points(session=session, lead_ids=[lead_id], playbook=one, now=at + timedelta(days=14))
    assert row.points == pytest.approx(15.0, abs=1e-12, rel=0)
    assert row.events == 1


def test_a_daily_cap_counts_the_first_events_of_each_utc_day(engine: Engine, playbook: Playbook) -> None:
    capped = _playbook(playbook, 24, {"page_view": EventRule(points=1, max_per_day=2)})
    with session_scope(engine) as session:
        lead_id = _only_lead(session)
        # Five on one UTC day (the last two minutes before midnight included), one just after midnight.
        times = [T0 + timedelta(hours=h) for h in (0, 1, 2, 3)] + [T0.replace(hour=23, minute=59)]
        times.append(T0.replace(hour=23, minute=59) + timedelta(minutes=2))
        session.execute(
            insert(Event),
            [
                {"lead_id": lead_id, "kind": "page_view", "occurred_at": t, "received_at": T0, "properties": {}}
                for t in times
            ],
        )
    now = T0 + timedelta(days=3)
    with session_scope(engine) as session:
        [row] = chunk_points(session=session, lead_ids=[lead_id], playbook=capped, now=now)
    reference = event_points([ActivityEvent("page_view", t) for t in times], capped.scoring, now)
    assert row.events == 6
    assert row.points == pytest.approx(reference.total, abs=1e-12, rel=0)
    assert len(reference.counted) == 3  # 2 on the first day, 1 on the next


def test_a_replay_scored_in_sql_gives_the_scores_the_cycles_gave(engine: Engine, playbook: Playbook) -> None:
    """Leads scored cycle by cycle (in Python, caps counted across cycles), then replayed from every
    event in the database's sum: the same scores, to 1e-9, and nothing moves."""
    from db.cycle import all_lead_ids
    from flows.advancing import advance_leads
    from tests.db.world import World

    world = World(engine, playbook)
    emails = [f"lead{n}@northwind.example" for n in range(5)]
    for n, email in enumerate(emails):
        world.lead(email, at=T0, job_title="Head of Data" if n % 2 else "Analyst", company_size=40 * n, country="US")
    # Bursts over several cycles: 14 page views and 5 pricing views on one day (capped at 10 and 3), split across
    # two cycles so the caps must count what the first cycle already scored.
    for cycle, start in enumerate((T0, T0 + timedelta(hours=5), T0 + timedelta(days=3))):
        for n, email in enumerate(emails):
            views = [("page_view", start + timedelta(minutes=m)) for m in range(7 + n)]
            pricing = [("pricing_view", start + timedelta(minutes=m, seconds=30)) for m in range(3)]
            world.events(email, *views, *pricing, ("email_click", start + timedelta(seconds=cycle)))
        world.advance(start + timedelta(hours=1))
    now = T0 + timedelta(days=9, hours=2)
    world.advance(now)
    before = {email: world.row(email) for email in emails}
    with session_scope(engine) as session:
        ids = all_lead_ids(session=session, after_id=0, limit=100)
        result = advance_leads(session=session, lead_ids=ids, playbook=playbook, now=now, replay=True)
    for email in emails:
        after = world.row(email)
        assert after.score == pytest.approx(before[email].score, abs=1e-9, rel=0)
        assert after.engagement == pytest.approx(before[email].engagement, abs=1e-9, rel=0)
        assert after.stage == before[email].stage
    assert result.score_changes == 0
    assert sum(result.transitions.values()) == 0


def test_the_scoring_version_in_use_is_set_once_by_a_first_cycle_and_replaced_by_a_rescore(engine: Engine) -> None:
    from db.cycle import record_scoring_version, scoring_version_in_use

    with session_scope(engine) as session:
        assert scoring_version_in_use(session=session) is None
        record_scoring_version(session=session, version="v1", now=T0, set_by="first cycle", only_if_unset=True)
        # A second first cycle (two at once) neither fails nor replaces it.
        record_scoring_version(session=session, version="v2", now=T0, set_by="first cycle", only_if_unset=True)
        assert scoring_version_in_use(session=session) == "v1"
        record_scoring_version(session=session, version="v3", now=T0, set_by="rescore-all")
    with session_scope(engine) as session:
        assert scoring_version_in_use(session=session) == "v3"
