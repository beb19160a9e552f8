"""The benchmark data generator writes what it says: exact counts, a fresh import, real-looking skew."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sqlalchemy import select

from benchmarks.generate import NOW, generate
from db.cycle import PROFILE_COLUMNS
from db.engine import get_engine, session_scope
from db.models import Event, Lead
from nurture.playbook import Playbook
from nurture.scoring import rule_matches


def _read(url: str) -> tuple[list[Lead], list[Event]]:
    with session_scope(get_engine(url)) as session:
        return list(session.scalars(select(Lead))), list(session.scalars(select(Event)))


def test_generator_writes_exactly_n_unscored_leads_and_m_skewed_events(database_url: str, playbook: Playbook) -> None:
    generate(database_url, leads=500, events=5000, seed=3)
    leads, events = _read(database_url)

    assert len(leads) == 500
    assert len(events) == 5000
    assert all(lead.needs_rescore and lead.stage == "cold" and lead.scored_at is None for lead in leads)
    assert not any(event.applied for event in events)
    assert all(event.occurred_at <= NOW for event in events)
    # Heavy tail: many leads with no event, a few with many.
    per_lead = Counter(event.lead_id for event in events)
    assert sum(1 for lead in leads if lead.id not in per_lead) > 25
    assert max(per_lead.values()) > 8 * (5000 / 500)
    # Kinds weighted: page views first, purchases rare, and a kind the playbook does not score.
    kinds = Counter(event.kind for event in events)
    assert kinds.most_common(1)[0][0] == "page_view"
    assert kinds["purchase"] < kinds["demo_request"] < kinds["form_submit"] < kinds["page_view"]
    assert kinds["email_machine_open"] > 0
    assert "email_machine_open" not in playbook.scoring.events
    # More recent activity: the last 30 days hold more events than the 60 before them.
    recent = sum(1 for event in events if (NOW - event.occurred_at).days < 30)
    assert recent > len(events) / 2
    # Every fit rule matches some leads and misses others.
    for rule in playbook.scoring.fit:
        matched = sum(rule_matches(rule, {c: getattr(lead, c) for c in PROFILE_COLUMNS}) for lead in leads)
        assert 0 < matched < len(leads), rule.label


def test_the_same_seed_writes_the_same_rows(tmp_path: Path) -> None:
    first, second = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    generate(first, leads=50, events=400, seed=5)
    generate(second, leads=50, events=400, seed=5)

    def rows(url: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
        leads, events = _read(url)
        return (
            [(lead.id, lead.email, lead.job_title, lead.company_size, lead.country, lead.attributes) for lead in leads],
            sorted((e.lead_id, e.kind, e.occurred_at) for e in events),
        )

    assert rows(first) == rows(second)
