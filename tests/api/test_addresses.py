"""An address written another way is the same person at the HTTP edge: an unsubscribe, a bounce or a spam
report in NFD, with a trailing dot or with a punycode domain suppresses the lead stored in the canonical
spelling, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, select

from db.engine import session_scope
from db.models import Lead, Suppression
from nurture.privacy import email_hash
from nurture.transports import InMemoryTransport
from tests.api.conftest import NOW, TOKEN, sign
from tests.conftest import T0
from tests.db.world import World

# (as the lead was stored, as the event writes it)
SPELLINGS = [
    pytest.param("josé@f.example", "jose\u0301@f.example", id="NFD"),
    pytest.param("ann@f.example", "Ann@F.example.", id="trailing-dot"),
    pytest.param("josé@bücher.example", "josé@xn--bcher-kva.example", id="punycode"),
]


def _hot(world: World, email: str) -> None:
    world.mailed_hot_lead(email, at=T0, now=NOW)
    assert [m.status for m in world.messages(email)] == ["sent", "queued"]


def _after(world: World, stored: str) -> tuple[list[str], list[str], int]:
    """The suppression list's hashes, the lead's messages, and how many leads there are."""
    with session_scope(world.engine) as session:
        hashes = list(session.scalars(select(col(Suppression.email_hash))))
        leads = len(list(session.scalars(select(col(Lead.id)))))
    return hashes, [m.status for m in world.messages(stored)], leads


@pytest.mark.parametrize(("stored", "written"), SPELLINGS)
def test_an_unsubscribe_through_the_events_api_in_another_spelling_stops_the_mail(
    client: TestClient, world: World, stored: str, written: str
) -> None:
    _hot(world, stored)
    event = {"email": written, "kind": "unsubscribe", "occurred_at": (NOW + timedelta(minutes=5)).isoformat()}
    answer = client.post("/v1/events", headers={"Authorization": f"Bearer {TOKEN}"}, json=event)
    assert answer.status_code == 200, answer.text
    assert answer.json()["leads_created"] == 0
    assert _after(world, stored) == ([email_hash(stored)], ["sent", "cancelled"], 1)


@pytest.mark.parametrize("kind", ["bounce", "spamreport"])
@pytest.mark.parametrize(("stored", "written"), SPELLINGS)
def test_a_bounce_or_spam_report_from_sendgrid_in_another_spelling_stops_the_mail(
    client: TestClient, world: World, stored: str, written: str, kind: str
) -> None:
    _hot(world, stored)
    at = int((NOW + timedelta(minutes=5)).timestamp())
    body = json.dumps([{"email": written, "event": kind, "timestamp": at, "sg_event_id": "e-1"}]).encode()
    answer = client.post("/webhooks/sendgrid", content=body, headers=sign(body))
    assert answer.status_code == 200, answer.text
    assert answer.json()["suppressions_added"] == 1
    assert _after(world, stored) == ([email_hash(stored)], ["sent", "cancelled"], 1)
    for days in (3, 12, 30):
        world.advance(NOW + timedelta(days=days))
        world.dispatch(NOW + timedelta(days=days))
    assert isinstance(world.transport, InMemoryTransport)
    assert len(world.transport.sent) == 1  # the first email, sent before
