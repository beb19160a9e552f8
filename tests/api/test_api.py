"""The HTTP edge through FastAPI's TestClient, on SQLite and PostgreSQL, with real ECDSA signatures."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlmodel import col

from db.engine import session_scope
from db.inbound import forget_lead
from db.models import Event, Lead, Message, Suppression
from db.reports import explain_lead
from nurture.api import SIGNATURE, TIMESTAMP
from nurture.privacy import email_hash
from nurture.transports import InMemoryTransport
from tests.api.conftest import ANN, NOW, TOKEN, sign
from tests.conftest import T0
from tests.db.world import SENDER, World


def _hot(world: World, email: str = ANN) -> list[Message]:
    world.mailed_hot_lead(email, at=T0, now=NOW)
    return world.messages(email)


def _event(kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "email": ANN,
        "timestamp": int(T0.timestamp()) + 3600,
        "event": kind,
        "sg_event_id": f"ev-{kind}",
        "sg_message_id": "abc123.filter0001",
        **extra,
    }


def _count(engine: Engine, model: Any) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_a_signed_batch_is_stored_once_however_often_it_is_posted(client: TestClient, world: World) -> None:
    _hot(world)
    body = json.dumps([_event("open"), _event("click", url="https://acme.example/pricing")]).encode()
    answers = [client.post("/webhooks/sendgrid", content=body, headers=sign(body)) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json()["events_stored"] == 2
    assert answers[1].json()["events_stored"] == 0
    assert answers[2].json()["duplicates"] == 2
    with session_scope(world.engine) as session:
        kinds = sorted(session.scalars(select(col(Event.kind)).where(col(Event.source) == "sendgrid")))
    assert kinds == ["email_click", "email_open"]


@pytest.mark.parametrize("case", ["missing", "forged", "stale", "tampered", "garbage"])
def test_bad_signatures_are_rejected_and_nothing_is_stored(client: TestClient, world: World, case: str) -> None:
    _hot(world)
    body = json.dumps([_event("unsubscribe")]).encode()
    headers = sign(body)
    if case == "missing":
        headers.pop(SIGNATURE)
    elif case == "forged":
        other = ec.generate_private_key(ec.SECP256R1())
        headers[SIGNATURE] = base64.b64encode(
            other.sign(headers[TIMESTAMP].encode() + body, ec.ECDSA(hashes.SHA256()))
        ).decode()
    elif case == "stale":
        headers = sign(body, timestamp=str(int(time.time()) - 3600))
    elif case == "tampered":
        body = body.replace(b"unsubscribe", b"open")
    else:
        headers[SIGNATURE] = "not base64 at all!"
    answer = client.post("/webhooks/sendgrid", content=body, headers=headers)
    assert answer.status_code == (401 if case == "missing" else 403)
    assert _count(world.engine, Suppression) == 0
    assert _count(world.engine, Event) == 3  # only the three the lead had before


def test_every_event_type_has_its_effect(client: TestClient, world: World) -> None:
    messages = _hot(world)
    first, second = messages  # demo_offer sent; sales_handoff queued
    bob_sent = _hot(world, "bob@northwind.example")[0]
    with session_scope(world.engine) as session:  # an unanswered send, waiting to be settled
        session.execute(
            Message.__table__.update()
            .where(Message.__table__.c.id == first.id)  # type: ignore[attr-defined]
            .values(status="sending")
        )
    events = [
        _event("processed", nurture_message_id=str(first.id)),
        _event("delivered", nurture_message_id=str(first.id)),
        _event("deferred", response="try later"),
        _event("open", category="demo_offer"),
        _event("click", category=["demo_offer", "hot"], url="https://acme.example"),
        _event("group_unsubscribe", asm_group_id=1),
        {
            **_event("bounce", reason="550 no such user"),
            "email": "bob@northwind.example",
            "sg_event_id": "b1",
            "nurture_message_id": str(bob_sent.id),
        },
        {**_event("spamreport"), "email": "carol@elsewhere.example"},
        {**_event("dropped", reason="Invalid"), "email": "dan@elsewhere.example"},
        {**_event("dropped", reason="Spam Content"), "email": "erin@elsewhere.example"},
        {**_event("group_resubscribe"), "email": "nobody@x.example"},
        {**_event("machine_opened"), "sg_event_id": "x"},
    ]
    body = json.dumps(events).encode()
    answer = client.post("/webhooks/sendgrid", content=body, headers=sign(body))
    assert answer.status_code == 200, answer.text
    assert answer.json()["ignored"] == 1
    with session_scope(world.engine) as session:
        reasons = dict(session.execute(select(col(Suppression.email), col(Suppression.reason))).all())
        settled = session.get(Message, first.id)
        assert settled is not None
        assert settled.status == "sent"
        assert settled.provider_message_id == "abc123"
        assert session.get(Message, second.id).status == "cancelled"  # type: ignore[union-attr]
        bounced = session.get(Message, bob_sent.id)
        assert bounced is not None
        assert (bounced.status, bounced.last_error) == ("failed", "bounce: 550 no such user")
    assert reasons == {
        ANN: "group_unsubscribe",
        "bob@northwind.example": "bounce",
        "carol@elsewhere.example": "spamreport",
        "dan@elsewhere.example": "dropped",
    }
    assert [e.state for e in world.enrollments("bob@northwind.example")] == ["exited"]
    # A later resubscribe lifts the group unsubscribe (and only that kind).
    body = json.dumps([{**_event("group_resubscribe"), "sg_event_id": "r1"}]).encode()
    client.post("/webhooks/sendgrid", content=body, headers=sign(body))
    with session_scope(world.engine) as session:
        assert session.scalar(select(col(Suppression.reason)).where(col(Suppression.email) == ANN)) is None


def test_payload_quirks_do_not_fail_the_batch(client: TestClient, world: World) -> None:
    _hot(world)
    no_id = {"email": ANN, "timestamp": int(T0.timestamp()) + 60, "event": "open"}
    events = [
        no_id,
        {"email": "not an address", "timestamp": 1, "event": "open", "sg_event_id": "bad-email"},
        {"email": ANN, "event": "click", "sg_event_id": "no-time"},
        "not an object",
        {**_event("click"), "sg_message_id": None, "category": "x"},
    ]
    body = json.dumps(events).encode()
    answer = client.post("/webhooks/sendgrid", content=body, headers=sign(body))
    assert answer.status_code == 200
    assert answer.json()["events_stored"] == 2
    assert len(answer.json()["problems"]) == 2
    again = client.post("/webhooks/sendgrid", content=body, headers=sign(body))
    assert again.json()["events_stored"] == 0  # the event without sg_event_id is recognised by its hash


@pytest.mark.parametrize("kind", ["unsubscribe", "spamreport", "bounce"])
@pytest.mark.parametrize("route", ["/v1/events", "/webhooks/sendgrid"])
def test_an_unsubscribe_spam_report_or_bounce_suppresses_whichever_route_brings_it(
    client: TestClient, world: World, route: str, kind: str
) -> None:
    assert isinstance(world.transport, InMemoryTransport)
    _hot(world)
    assert [m.status for m in world.messages(ANN)] == ["sent", "queued"]
    at = NOW + timedelta(minutes=5)
    if route == "/v1/events":
        answer = client.post(
            route,
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={"events": [{"email": ANN.upper(), "kind": kind, "occurred_at": at.isoformat(), "id": "w-1"}]},
        )
    else:
        body = json.dumps([{**_event(kind), "timestamp": int(at.timestamp())}]).encode()
        answer = client.post(route, content=body, headers=sign(body))
    assert answer.status_code == 200, answer.text
    with session_scope(world.engine) as session:
        rows = [(row.email_hash, row.reason) for row in session.scalars(select(Suppression))]
    assert rows == [(email_hash(ANN), kind)]
    assert [m.status for m in world.messages(ANN)] == ["sent", "cancelled"]
    assert [e.state for e in world.enrollments(ANN)] == ["exited"]
    assert answer.json()["suppressions_added"] == 1
    for days in (1, 3, 12, 30, 45):
        world.advance(NOW + timedelta(days=days))
        world.dispatch(NOW + timedelta(days=days))
    assert len(world.transport.sent) == 1  # the demo offer sent before; nothing after


def test_opens_and_clicks_move_the_score_on_the_next_cycle(client: TestClient, world: World) -> None:
    _hot(world)
    before = world.row(ANN).score
    body = json.dumps([_event("open"), _event("click")]).encode()
    client.post("/webhooks/sendgrid", content=body, headers=sign(body))
    assert world.row(ANN).score == before  # the API only appends
    world.advance(T0 + timedelta(hours=2))
    assert world.ledger(ANN)[-1].contributions.keys() >= {"event: email_open", "event: email_click"}


def test_oversized_and_malformed_bodies(client: TestClient) -> None:
    big = b"[" + b" " * 2_000_000 + b"]"
    assert client.post("/webhooks/sendgrid", content=big, headers=sign(big)).status_code == 413
    bad = b"[{not json"
    answer = client.post("/webhooks/sendgrid", content=bad, headers=sign(bad))
    assert answer.status_code == 400
    assert "not valid JSON" in answer.json()["detail"]


def test_the_events_api(client: TestClient, world: World) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/events", json={"email": ANN, "kind": "page_view"}).status_code == 401
    one = client.post("/v1/events", json={"email": ANN, "kind": "page_view", "id": "pv-1"}, headers=auth)
    assert one.json() == {"accepted": 1, "duplicates": 0, "leads_created": 1, "suppressions_added": 0, "errors": []}
    batch = client.post(
        "/v1/events",
        headers=auth,
        json={
            "events": [
                {"email": ANN, "kind": "page_view", "id": "pv-1"},
                {"email": ANN, "kind": "demo_request", "occurred_at": "2026-03-02T10:00:00Z"},
                {"email": "nope", "kind": "page_view"},
                {"email": ANN, "kind": "Bad Kind"},
                {"email": ANN, "kind": "pricing_view", "occurred_at": "soon"},
            ]
        },
    )
    assert batch.status_code == 200
    assert batch.json()["accepted"] == 1
    assert batch.json()["duplicates"] == 1
    assert [e["index"] for e in batch.json()["errors"]] == [2, 3, 4]
    assert "'nope' is not an email address" in batch.json()["errors"][0]["error"]
    only_bad = client.post("/v1/events", headers=auth, json={"events": [{"email": "x"}]})
    assert only_bad.status_code == 422
    assert client.post("/v1/events", headers=auth, content=b"{oops").status_code == 400


def test_an_unsubscribe_link_from_an_email_stops_the_next_step(client: TestClient, world: World) -> None:
    _hot(world)
    assert isinstance(world.transport, InMemoryTransport)
    (sent,) = world.transport.sent
    path = sent.unsubscribe_url.removeprefix(SENDER.public_url)
    page = client.get(path)
    assert page.status_code == 200
    assert "<form method=post" in page.text
    assert _count(world.engine, Suppression) == 0  # a GET (a mail scanner) changes nothing
    assert client.post(path).status_code == 200  # RFC 8058 one-click POST
    assert world.dispatch(NOW + timedelta(days=3)).claimed == 0
    assert [m.status for m in world.messages(ANN)] == ["sent", "cancelled"]
    with session_scope(world.engine) as session:
        report = explain_lead(session=session, email=ANN, playbook=world.playbook, now=NOW)
    assert report is not None
    assert report["suppression"]["reason"] == "unsubscribe"
    assert client.get("/unsubscribe/forged.token").status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}


def test_forget_erases_the_person_and_keeps_them_unmailable(world: World) -> None:
    _hot(world)
    with session_scope(world.engine) as session:
        result = forget_lead(session=session, email=ANN, now=NOW)
    assert result.lead_found
    for model in (Lead, Event, Message):
        assert _count(world.engine, model) == 0
    with session_scope(world.engine) as session:
        (row,) = session.scalars(select(Suppression)).all()
        assert (row.email, row.email_hash, row.reason) == (None, email_hash(ANN), "forgotten")
    # The address comes back in an import and heats up again: it is still never mailed.
    transport = InMemoryTransport()
    world.transport = transport
    _hot(world)
    assert transport.sent == []
    assert world.messages(ANN)[0].status == "suppressed"


def test_the_demo_population_driven_over_http_moves_on_the_next_cycle(client: TestClient, world: World) -> None:
    """Events-API calls and signed webhook batches instead of the generator: the lifecycle responds."""
    from nurture.population import generate_population

    end = T0 + timedelta(weeks=3)
    population = generate_population(leads=40, start=T0, end=end, seed=9)
    for lead in population.leads:
        world.lead(lead.email, at=T0, **lead.profile)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    events = [
        {
            "email": e.email,
            "kind": e.kind,
            "occurred_at": e.occurred_at.isoformat(),
            "id": e.external_id,
            "properties": e.properties,
        }
        for e in population.events
    ]
    for start in range(0, len(events), 500):
        answer = client.post("/v1/events", headers=auth, json={"events": events[start : start + 500]})
        assert answer.json()["errors"] == []
    opens = [
        {"email": lead.email, "timestamp": int(end.timestamp()) - 60, "event": "open", "sg_event_id": f"open-{i}"}
        for i, lead in enumerate(population.leads)
    ]
    body = json.dumps(opens).encode()
    assert client.post("/webhooks/sendgrid", content=body, headers=sign(body)).json()["events_stored"] == 40
    result = world.advance(end)
    assert result.leads == 40
    assert result.transitions["cold→warm"] > 0
    assert result.transitions["cold→hot"] > 0
    assert world.walked.messages_queued > 0


def test_the_api_and_the_cycle_write_at_the_same_time(client: TestClient, world: World) -> None:
    """SQLite in WAL mode with a busy timeout: neither side fails with "database is locked"."""
    import threading

    for i in range(50):
        world.lead(f"lead{i}@busy.example", at=T0)
    failures: list[BaseException] = []

    def cycles() -> None:
        try:
            for hour in range(1, 16):
                world.advance(T0 + timedelta(hours=hour))
        except BaseException as exc:  # reported below, with the assertion
            failures.append(exc)

    worker = threading.Thread(target=cycles)
    worker.start()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for batch in range(15):
        events = [
            {
                "email": f"lead{i}@busy.example",
                "kind": "page_view",
                "occurred_at": (T0 + timedelta(minutes=batch * 60 + i)).isoformat(),
            }
            for i in range(50)
        ]
        assert client.post("/v1/events", headers=auth, json={"events": events}).json()["accepted"] == 50
    worker.join()
    assert failures == []
    assert _count(world.engine, Event) == 750


def test_opens_and_clicks_name_their_email_and_a_machine_open_scores_nothing(client: TestClient, world: World) -> None:
    first = _hot(world)[0]
    events = [
        {**_event("open"), "sg_event_id": "o1", "nurture_message_id": str(first.id)},
        {**_event("click", url="https://acme.example/demo"), "sg_event_id": "c1", "nurture_message_id": str(first.id)},
        # Apple Mail Privacy Protection fetched the images: not a person opening the email.
        {**_event("open"), "sg_event_id": "m1", "nurture_message_id": str(first.id), "sg_machine_open": True},
    ]
    body = json.dumps(events).encode()
    assert client.post("/webhooks/sendgrid", content=body, headers=sign(body)).json()["events_stored"] == 3
    with session_scope(world.engine) as session:
        stored = {e.external_id: e for e in session.scalars(select(Event).where(col(Event.source) == "sendgrid"))}
    assert {k: e.kind for k, e in stored.items()} == {
        "o1": "email_open",
        "c1": "email_click",
        "m1": "email_machine_open",
    }
    assert {e.properties["nurture_message_id"] for e in stored.values()} == {first.id}
    world.advance(NOW + timedelta(hours=1))
    (change, *_) = reversed(world.ledger(ANN))
    assert set(change.contributions) >= {"event: email_open", "event: email_click"}
    assert "event: email_machine_open" not in change.contributions
