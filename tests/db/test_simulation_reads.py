"""The simulation's reads: a lead's whole history in one batch, through an engine that cannot write."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.imports import add_events, upsert_leads
from db.inbound import ingest_provider_events
from db.models import Message
from db.simulation import lead_histories, live_enrollments, read_only_engine
from nurture.history import PastEvent
from nurture.importing import EventRecord, LeadRecord
from nurture.inbound import parse_sendgrid_batch
from nurture.playbook import Playbook, Stage
from tests.conftest import T0
from tests.db.world import World


def test_the_read_only_engine_refuses_every_write(engine: Engine, database_url: str) -> None:
    with session_scope(engine) as session:
        upsert_leads(session=session, records=[LeadRecord(1, "ann@northwind.example", {}, {})], now=T0)
    reader = read_only_engine(database_url)
    with reader.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM lead")).scalar_one() == 1
    with pytest.raises(DBAPIError, match=r"(?i)read-?only"), reader.begin() as conn:
        conn.execute(text("UPDATE lead SET stage = 'hot'"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT stage FROM lead")).scalar_one() == "cold"
    reader.dispose()


def test_a_batch_of_histories_has_events_in_order_and_the_email_each_click_was_about(
    engine: Engine, database_url: str, playbook: Playbook
) -> None:
    world = World(engine, playbook)
    world.lead("ann@northwind.example", at=T0, job_title="CTO", company_size=500)
    world.lead("bob@northwind.example", at=T0)
    world.events(
        "ann@northwind.example",
        ("pricing_view", T0 + timedelta(hours=1)),
        ("demo_request", T0),
        ("webinar_attended", T0 + timedelta(hours=1)),
    )
    world.cycle(T0 + timedelta(hours=2))
    [offer] = [m for m in world.messages("ann@northwind.example") if m.step_id == "demo_offer"]
    click = {
        "email": "ann@northwind.example",
        "event": "click",
        "timestamp": int((T0 + timedelta(hours=3)).timestamp()),
        "sg_event_id": "click-1",
        "nurture_message_id": str(offer.id),
        "url": "https://acme-analytics.example/demo",
    }
    with session_scope(engine) as session:
        ingest_provider_events(
            session=session, events=parse_sendgrid_batch([click]).events, now=T0 + timedelta(hours=3)
        )
        add_events(
            session=session,
            records=[EventRecord(1, "bob@northwind.example", "page_view", T0 + timedelta(days=9))],
            now=T0,
        )
        ids = [int(i) for i in session.execute(text("SELECT id FROM lead ORDER BY id")).scalars()]
        assert session.query(Message).count() > 0

    with Session(read_only_engine(database_url)) as session:
        ann, bob = lead_histories(session=session, lead_ids=ids, now=T0 + timedelta(days=1))
        [live] = [e for e in live_enrollments(session=session, lead_ids=ids) if e.sequence == "demo_offer"]

    assert ann.email == "ann@northwind.example"
    assert ann.profile["job_title"] == "CTO"
    assert ann.live_stage == Stage.hot
    assert [(e.kind, e.occurred_at) for e in ann.events][:2] == [
        ("demo_request", T0),
        ("pricing_view", T0 + timedelta(hours=1)),
    ]
    assert PastEvent("email_click", T0 + timedelta(hours=3), ("demo_offer", "demo_offer")) in ann.events
    # Events after `now` are not part of the history yet.
    assert bob.events == ()
    assert (live.email, live.stage, live.steps_done) == ("ann@northwind.example", Stage.hot, ("demo_offer",))
