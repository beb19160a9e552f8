"""Dispatch on a real database: due messages go out once; suppressed and broken ones never do."""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert

from db.engine import session_scope
from db.models import Suppression
from nurture.playbook import Playbook
from nurture.privacy import email_hash
from nurture.transports import FileOutboxTransport, InMemoryTransport
from nurture.transports.sendgrid_v3 import SendGridTransport
from nurture.unsubscribe import read_unsubscribe_token
from tests.conftest import T0, TEMPLATES_DIR
from tests.db.world import SENDER, World
from tests.fakes.fake_sendgrid import FakeSendGrid

ANN = "ann@northwind.example"


def _hot_lead(world: World, email: str = ANN, **profile: object) -> None:
    world.lead(email, at=T0, first_name="Ann", job_title="CTO", company="Northwind", company_size=500, **profile)
    world.events(email, ("demo_request", T0), ("webinar_attended", T0), ("pricing_view", T0))
    world.advance(T0 + timedelta(minutes=10))


def test_due_messages_are_sent_once_to_the_outbox(engine: Engine, playbook: Playbook, tmp_path: Path) -> None:
    world = World(engine, playbook, transport=FileOutboxTransport(tmp_path))
    _hot_lead(world)
    now = T0 + timedelta(minutes=10)
    first = world.dispatch(now)
    assert first.by_status == {"sent": 1}
    assert world.dispatch(now).claimed == 0
    later = T0 + timedelta(days=2, minutes=10)
    assert world.cycle(later).by_status == {"sent": 1}
    assert world.cycle(later).claimed == 0
    files = sorted(tmp_path.glob("*.eml"))
    assert len(files) == 2
    messages = world.messages(ANN)
    assert [(m.template, m.status, m.attempts) for m in messages] == [
        ("demo_offer", "sent", 1),
        ("sales_handoff", "sent", 1),
    ]
    assert messages[0].subject == "See Acme Analytics on your own data"
    assert messages[1].subject == "Your Acme Analytics contact for Northwind"
    parsed = BytesParser(policy=policy.default).parse(files[0].open("rb"))
    link = str(parsed["List-Unsubscribe"]).strip().strip("<>")
    assert link.startswith(SENDER.public_url + "/unsubscribe/")
    token = link.rsplit("/", 1)[1]
    found = read_unsubscribe_token(token, email=ANN, keys=[SENDER.secret_key], now=later, link_days=400)
    assert found is not None
    assert found.lead_id == world.row(ANN).id
    (enrollment,) = world.enrollments(ANN)
    assert enrollment.state == "completed"


def test_messages_are_not_sent_before_they_are_due(engine: Engine, playbook: Playbook) -> None:
    world = World(engine, playbook)
    _hot_lead(world)
    world.dispatch(T0 + timedelta(minutes=10))
    assert world.cycle(T0 + timedelta(days=1)).claimed == 0
    # Not even decided yet: the enrollment knows when the hand-off is due.
    assert [m.template for m in world.messages(ANN)] == ["demo_offer"]
    assert world.enrollments(ANN)[0].next_due_at == T0 + timedelta(days=2, minutes=10)


def test_a_suppressed_address_is_never_mailed(engine: Engine, playbook: Playbook) -> None:
    transport = InMemoryTransport()
    world = World(engine, playbook, transport=transport)
    _hot_lead(world)
    with session_scope(engine) as session:
        session.execute(
            insert(Suppression),
            [{"email": ANN, "email_hash": email_hash(ANN), "reason": "unsubscribe", "at": T0, "source": "test"}],
        )
    result = world.dispatch(T0 + timedelta(minutes=10))
    assert result.by_status == {"suppressed": 1}
    assert transport.sent == []
    (message,) = world.messages(ANN)
    assert (message.status, message.last_error) == ("suppressed", "address suppressed: unsubscribe")
    # Nothing more is decided for a suppressed address: its enrollment ends.
    (enrollment,) = world.enrollments(ANN)
    assert (enrollment.state, enrollment.exit_reason, enrollment.next_due_at) == ("exited", "address suppressed", None)
    assert world.cycle(T0 + timedelta(days=5)).claimed == 0


def test_a_broken_template_fails_its_message_with_the_reason(
    engine: Engine, playbook: Playbook, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    (templates / "demo_offer.html").write_text(
        '{% extends "_layout.html" %}{% block body %}{{ lead.nickname }}{% endblock %}'
    )
    transport = InMemoryTransport()
    world = World(engine, playbook, transport=transport, templates=templates)
    _hot_lead(world)
    result = world.dispatch(T0 + timedelta(minutes=10))
    assert result.by_status == {"failed": 1}
    assert transport.sent == []
    (failure,) = result.problems
    assert "demo_offer.html" in failure.reason
    assert "nickname" in failure.reason


def test_the_sendgrid_transport_in_a_dispatch(engine: Engine, playbook: Playbook) -> None:
    with FakeSendGrid() as fake:
        world = World(engine, playbook, transport=SendGridTransport(api_key=fake.api_key, host=fake.url))
        for i in range(5):
            _hot_lead(world, f"lead{i}@northwind.example")
        fake.fail_next(503)
        now = T0 + timedelta(minutes=10)
        assert world.dispatch(now).by_status == {"sent": 5}  # the 503 was retried at once
        assert len(fake.rejected) == 1
        assert len(fake.accepted) == 5
        assert fake.schema_errors == []
        recipients = sorted(b["personalizations"][0]["to"][0]["email"] for b in fake.accepted)
        assert recipients == [f"lead{i}@northwind.example" for i in range(5)]


def test_an_ambiguous_send_is_never_resent(engine: Engine, playbook: Playbook) -> None:
    with FakeSendGrid() as fake:
        world = World(
            engine, playbook, transport=SendGridTransport(api_key=fake.api_key, host=fake.url, timeout_seconds=0.5)
        )
        _hot_lead(world)
        fake.accept_slowly_next(2.0)
        now = T0 + timedelta(minutes=10)
        assert world.dispatch(now).by_status == {"in_doubt": 1}
        assert world.dispatch(now + timedelta(hours=1)).claimed == 0
        (message,) = world.messages(ANN)
        assert message.status == "in_doubt"
        assert message.last_error is not None
        assert message.last_error.startswith("outcome unknown, not resent")
        assert len(fake.accepted) == 1


def test_naive_datetimes_are_refused(engine: Engine, playbook: Playbook) -> None:
    world = World(engine, playbook)
    with pytest.raises(Exception, match="naive datetime"):
        world.lead(ANN, at=datetime(2026, 1, 1))
    world.lead(ANN, at=datetime(2026, 1, 1, tzinfo=UTC))
    assert world.row(ANN).created_at.tzinfo is not None


def test_many_requests_are_in_flight_over_kept_alive_connections(engine: Engine, playbook: Playbook) -> None:
    with FakeSendGrid(latency_seconds=0.1) as fake:
        transport = SendGridTransport(api_key=fake.api_key, host=fake.url)
        world = World(engine, playbook, transport=transport)
        emails = world.hot_leads(96, at=T0, advance_to=T0 + timedelta(minutes=10))
        result = world.dispatch(T0 + timedelta(minutes=10), concurrency=32)
        assert result.by_status == {"sent": 96}
        assert fake.schema_errors == []
        assert sorted(Counter(fake.message_ids()).values()) == [1] * 96, "each message was requested once"
        assert fake.requests == 96
        assert fake.max_in_flight == 32, "the dispatcher kept its concurrency in flight"
        assert fake.connections <= 32, "each sending thread reused its connection"
        assert transport.connections_opened == fake.connections
        assert {m.status for e in emails for m in world.messages(e)} == {"sent"}
        transport.close()
