"""A dispatcher that stops at any instant loses nothing and sends nothing twice, on both engines.

The process-level proof (SIGKILL at random instants) is the crash suite
(tests/suites/crash.py); these tests pin each mechanism it relies on.
"""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from db.dispatch import claim_due_messages, mark_sending
from db.engine import session_scope
from db.inbound import ingest_provider_events
from db.messages import MessageSelection, retry_messages
from db.models import Message
from flows.sending import DispatchResult, dispatch_due
from nurture.delivery import MessageStatus
from nurture.inbound import ProviderEvent
from nurture.playbook import Playbook
from nurture.rendering import EmailRenderer
from nurture.transports import InMemoryTransport
from nurture.transports.base import OutgoingEmail
from tests.conftest import T0, TEMPLATES_DIR
from tests.db.world import FAST_RETRIES, SENDER, World

NOW = T0 + timedelta(minutes=10)
LEASE = timedelta(minutes=10)


class ProcessKilled(BaseException):
    """Stands for the dispatcher's process dying in the middle of a request."""


class DyingTransport(InMemoryTransport):
    """Hands emails over until its ``dies_on``-th request, which leaves and never gets an answer."""

    def __init__(self, dies_on: int) -> None:
        super().__init__()
        self.dies_on = dies_on
        self.requests = 0

    def send(self, email: OutgoingEmail) -> str:
        self.requests += 1
        provider_id = super().send(email)
        if self.requests >= self.dies_on:
            raise ProcessKilled
        return provider_id


def _hot_leads(world: World, count: int) -> list[str]:
    return world.hot_leads(count, at=T0, advance_to=NOW)


def _dispatch(world: World, clock: datetime, *, concurrency: int = 1) -> DispatchResult:
    return dispatch_due(
        engine=world.engine,
        playbook=world.playbook,
        renderer=EmailRenderer(world.templates),
        transport=world.transport,
        sender=SENDER,
        now=NOW,
        clock=lambda: clock,
        concurrency=concurrency,
        policy=FAST_RETRIES,
        lease=LEASE,
    )


def _statuses(world: World) -> Counter[str]:
    return Counter(m.status for m in world.all(Message))


def test_a_claim_left_by_a_stopped_dispatcher_returns_to_the_queue_when_its_lease_runs_out(
    engine: Engine, playbook: Playbook
) -> None:
    transport = InMemoryTransport()
    world = World(engine, playbook, transport=transport)
    _hot_leads(world, 3)
    wall = datetime.now(UTC)
    with session_scope(engine) as session:  # a dispatcher claims, then dies before sending anything
        claimed = claim_due_messages(session=session, now=NOW, limit=100, owner="dead", claimed_at=wall, lease=LEASE)
    assert len(claimed) == 3
    assert _dispatch(world, wall + timedelta(minutes=1)).claimed == 0
    assert _statuses(world)[MessageStatus.claimed] == 3
    result = _dispatch(world, wall + LEASE + timedelta(seconds=1))
    assert result.released == 3
    assert result.by_status == {"sent": 3}
    assert sorted(Counter(e.message_id for e in transport.sent).values()) == [1, 1, 1]


def test_a_dispatcher_killed_mid_batch_leaves_only_its_requests_in_flight_in_doubt(
    engine: Engine, playbook: Playbook
) -> None:
    dying = DyingTransport(dies_on=7)
    world = World(engine, playbook, transport=dying)
    _hot_leads(world, 12)
    wall = datetime.now(UTC)
    with pytest.raises(ProcessKilled):
        _dispatch(world, wall, concurrency=2)
    statuses = _statuses(world)
    # Two in flight at most: the sends that came back before the kill are recorded, the one or two
    # in flight are `sending`, the rest still only claimed.
    sent, in_flight, claimed = (statuses[s] for s in (MessageStatus.sent, MessageStatus.sending, MessageStatus.claimed))
    assert 5 <= sent <= 6
    assert 1 <= in_flight <= 2
    assert sent + in_flight + claimed == 12

    survivor = InMemoryTransport()
    world.transport = survivor
    result = _dispatch(world, wall + LEASE + timedelta(seconds=1), concurrency=2)
    assert result.found_in_doubt == in_flight
    assert result.released == claimed
    assert result.by_status == {"sent": claimed}
    statuses = _statuses(world)
    assert (statuses[MessageStatus.sent], statuses[MessageStatus.in_doubt]) == (12 - in_flight, in_flight)
    assert statuses[MessageStatus.claimed] == statuses[MessageStatus.sending] == 0
    handed_over = Counter(e.message_id for e in [*dying.sent, *survivor.sent])
    assert max(handed_over.values()) == 1, "no message was handed to the provider twice"
    assert len(handed_over) == 12, "every message was handed over once: none lost"


def test_a_dispatcher_whose_claim_was_taken_over_does_not_send_it(engine: Engine, playbook: Playbook) -> None:
    transport = InMemoryTransport()
    world = World(engine, playbook, transport=transport)
    _hot_leads(world, 2)
    wall = datetime.now(UTC)
    with session_scope(engine) as session:  # a slow dispatcher claims...
        slow = claim_due_messages(session=session, now=NOW, limit=100, owner="slow", claimed_at=wall, lease=LEASE)
    later = wall + LEASE + timedelta(minutes=1)
    assert _dispatch(world, later).by_status == {"sent": 2}
    with session_scope(engine) as session:  # ...and wakes up after its lease ran out
        mine = mark_sending(session=session, ids=slow, owner="slow", started_at=later, lease_until=later + LEASE)
    assert mine == set()
    assert len(transport.sent) == 2


def test_sendgrids_events_settle_a_message_in_doubt(engine: Engine, playbook: Playbook) -> None:
    world = World(engine, playbook, transport=DyingTransport(dies_on=1))
    (email,) = _hot_leads(world, 1)
    wall = datetime.now(UTC)
    with pytest.raises(ProcessKilled):
        _dispatch(world, wall)
    world.transport = InMemoryTransport()
    assert _dispatch(world, wall + LEASE + timedelta(seconds=1)).found_in_doubt == 1
    (message, *_) = world.messages(email)
    assert message.status == MessageStatus.in_doubt
    processed = ProviderEvent(
        event_type="processed",
        email=email,
        occurred_at=NOW,
        external_id="sg-processed-1",
        message_id=message.id,
        provider_message_id="sg-abc",
        reason=None,
    )
    with session_scope(engine) as session:
        ingest_provider_events(session=session, events=[processed], now=NOW)
    (message, *_) = world.messages(email)
    assert message.status == MessageStatus.sent
    assert message.provider_message_id == "sg-abc"


def test_an_operator_retries_failed_messages_once_the_template_is_fixed(
    engine: Engine, playbook: Playbook, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    original = (templates / "demo_offer.html").read_text()
    (templates / "demo_offer.html").write_text(
        '{% extends "_layout.html" %}{% block body %}{{ lead.nickname }}{% endblock %}'
    )
    transport = InMemoryTransport()
    world = World(engine, playbook, transport=transport, templates=templates)
    emails = _hot_leads(world, 3)
    assert world.dispatch(NOW).by_status == {"failed": 3}
    (templates / "demo_offer.html").write_text(original)
    assert world.dispatch(NOW + timedelta(minutes=5)).claimed == 0  # failed stays failed until someone decides

    with session_scope(engine) as session:
        queued = retry_messages(
            session=session, selection=MessageSelection(template="demo_offer"), now=NOW + timedelta(minutes=5)
        )
    assert queued == 3
    assert world.dispatch(NOW + timedelta(minutes=5)).by_status == {"sent": 3}
    assert sorted(e.to_email for e in transport.sent) == sorted(emails)
    for email in emails:
        assert {e.state for e in world.enrollments(email)} == {"active"}  # the sequence's next step is still ahead
