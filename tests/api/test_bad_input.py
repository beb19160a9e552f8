"""Hostile and broken input gets a 4xx that names the problem, never a 500; good items of a batch are kept."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text
from sqlmodel import col

from db.engine import session_scope
from db.models import Event, Message
from nurture.api import REQUEST_ID, TIMESTAMP
from tests.api.conftest import ANN, NOW, TOKEN, sign
from tests.conftest import T0
from tests.db.world import World

AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
GOOD = {"email": ANN, "kind": "page_view", "occurred_at": "2026-03-02T10:00:00Z", "id": "good-1"}


def _item(**fields: str) -> str:
    """One event as JSON text; each value is JSON text too, so it can hold NaN, 1e999 or \\u0000."""
    defaults = {"email": '"bob@x.example"', "kind": '"page_view"', "occurred_at": '"2026-03-02T10:00:00Z"'}
    return "{" + ",".join(f'"{key}":{value}' for key, value in (defaults | fields).items()) + "}"


# (what, the bad item as JSON text, what its error must say)
BAD_ITEMS = [
    ("properties nested 20 deep", _item(properties='{"a":' * 20 + "1" + "}" * 20), "nested too deeply"),
    ("properties as a string nesting 40 deep", _item(properties=json.dumps("[" * 40 + "]" * 40)), "40 levels deep"),
    ("a 30-digit integer", _item(properties='{"n":' + "9" * 30 + "}"), "properties.n: the number"),
    ("a 5,000-digit integer", _item(properties='{"n":' + "9" * 5000 + "}"), "properties.n: the number"),
    ("a float overflow", _item(properties='{"n":1e999}'), "'1e999' cannot be stored"),
    ("NaN", _item(properties='{"n":[1,NaN]}'), "properties.n[1]: the number 'NaN'"),
    ("-Infinity", _item(properties='{"n":-Infinity}'), "'-Infinity' cannot be stored"),
    ("year 1 with an offset", _item(occurred_at='"0001-01-01T00:00:00+01:00"'), "out of range"),
    ("year 9999 with an offset", _item(occurred_at='"9999-12-31T23:59:59-01:00"'), "out of range"),
    ("year 1 in UTC", _item(occurred_at='"0001-01-01T00:00:00Z"'), "out of range"),
    ("year 2150", _item(occurred_at='"2150-01-01T00:00:00Z"'), "out of range"),
    ("a NUL in a property", _item(properties='{"page":"/a\\u0000b"}'), "properties.page: contains a NUL"),
    ("a NUL in a property key", _item(properties='{"pa\\u0000ge":1}'), "contains a NUL"),
    ("a lone surrogate in a property", _item(properties='{"p":"\\ud800"}'), "unpaired surrogate (\\ud800)"),
    ("a lone surrogate in a key", _item(properties='{"\\udc00":1}'), "unpaired surrogate"),
    ("a NUL in the address", _item(email='"b\\u0000b@x.example"'), "is not an email address"),
    ("a lone surrogate in the address", _item(email='"\\ud800@x.example"'), "is not an email address"),
    ("a 321-character address", _item(email=json.dumps("b" * 311 + "@x.example")), "at most 320"),
    ("a 65-character kind", _item(kind=json.dumps("k" * 65)), "at most 64"),
    ("a 201-character id", _item(id=json.dumps("i" * 201)), "at most 200"),
    ("a NUL in the id", _item(id='"i\\u0000"'), "id contains a NUL"),
    ("an object as id", _item(id='{"a":1}'), "id must be text or a whole number"),
    ("true as id", _item(id="true"), "id must be text or a whole number"),
    ("a 30-digit id", _item(id="9" * 30), "beyond 64 bits"),
    ("properties as a list", _item(properties="[1,2]"), "properties must be a JSON object"),
    ("properties as a number", _item(properties="3"), "properties must be a JSON object"),
    ("properties as plain text", _item(properties='"x"'), "properties is not valid JSON"),
    ("an event that is a number", "5", "each event must be a JSON object"),
]


def _stored(engine: Engine, source: str) -> list[Any]:
    with session_scope(engine) as session:
        return list(session.scalars(select(Event).where(col(Event.source) == source).order_by(col(Event.id))))


def test_each_bad_event_is_named_by_index_and_the_good_one_is_kept(client: TestClient, world: World) -> None:
    body = '{"events": [' + json.dumps(GOOD) + "," + ",".join(item for _, item, _ in BAD_ITEMS) + "]}"
    answer = client.post("/v1/events", content=body.encode(), headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 1
    errors = answer.json()["errors"]
    assert [e["index"] for e in errors] == list(range(1, len(BAD_ITEMS) + 1))
    for (what, _, expected), error in zip(BAD_ITEMS, errors, strict=True):
        assert expected in error["error"], f"{what}: {error['error']}"
        assert len(error["error"]) < 300, f"{what}: the error quotes too much of the input"
    assert [(e.kind, e.external_id) for e in _stored(world.engine, "api")] == [("page_view", "good-1")]


def test_a_batch_with_only_bad_events_is_422_and_stores_nothing(client: TestClient, world: World) -> None:
    body = '{"events": [' + ",".join(item for _, item, _ in BAD_ITEMS[:5]) + "]}"
    answer = client.post("/v1/events", content=body.encode(), headers=AUTH)
    assert answer.status_code == 422
    assert [e["index"] for e in answer.json()["errors"]] == [0, 1, 2, 3, 4]
    assert _stored(world.engine, "api") == []


@pytest.mark.parametrize(
    ("body", "content_type", "status", "detail"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "100000 levels deep; at most 32"),
        (b'{"events": ' + b"[" * 40 + b"]" * 40 + b"}", "application/json", 400, "41 levels deep"),
        (b'{"email": "\xff@x.example", "kind": "page_view"}', "application/json", 400, "not UTF-8"),
        (b'{"email": "ann@x.example", "kind": "page_view"', "application/json", 400, "not valid JSON"),
        (b"email=ann@x.example&kind=page_view", "application/x-www-form-urlencoded", 415, "application/json"),
        (json.dumps(GOOD).encode(), "text/plain", 415, "'text/plain'"),
        (json.dumps(GOOD).encode("utf-16"), "application/json; charset=utf-16", 415, "UTF-8"),
        (b"[1, 2]", "application/json", 422, "one event object"),
        (b'{"events": {"email": "ann@x.example"}}', "application/json", 422, "events must be a list"),
    ],
    ids=["deep", "deep-events", "not-utf8", "truncated", "form", "text", "utf16", "list", "events-object"],
)
def test_a_body_that_cannot_be_read_is_refused_whole(
    client: TestClient, world: World, body: bytes, content_type: str, status: int, detail: str
) -> None:
    answer = client.post("/v1/events", content=body, headers=AUTH | {"Content-Type": content_type})
    assert answer.status_code == status, answer.text
    payload = answer.json()
    message = payload["detail"] if "detail" in payload else payload["errors"][0]["error"]
    assert detail in message
    assert answer.headers[REQUEST_ID]
    assert _stored(world.engine, "api") == []


def test_json_with_a_charset_or_without_a_content_type_is_read(client: TestClient, world: World) -> None:
    with_charset = AUTH | {"Content-Type": "application/json; charset=UTF-8"}
    answer = client.post("/v1/events", content=json.dumps(GOOD).encode(), headers=with_charset)
    assert answer.status_code == 200, answer.text
    undeclared = {"Authorization": AUTH["Authorization"]}
    answer = client.post("/v1/events", content=json.dumps(GOOD | {"id": "good-2"}).encode(), headers=undeclared)
    assert answer.status_code == 200, answer.text
    assert len(_stored(world.engine, "api")) == 2


def _hot(world: World) -> list[Message]:
    world.mailed_hot_lead(ANN, at=T0, now=NOW)
    return world.messages(ANN)


def _sg(event: str, event_id: str | None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"email": ANN, "timestamp": int(NOW.timestamp()) + 60, "event": event, **extra}
    if event_id is not None:
        item["sg_event_id"] = event_id
    return item


def test_the_webhook_keeps_what_sendgrid_cannot_resend_and_names_what_it_cannot_use(
    client: TestClient, world: World
) -> None:
    sent, _queued = _hot(world)
    with session_scope(world.engine) as session:  # an unanswered send, to be settled by `processed`
        session.execute(Message.__table__.update().values(status="sending"))  # type: ignore[attr-defined]
    long_id = "x" * 300
    stamp = int(NOW.timestamp()) + 60
    items = [
        json.dumps(_sg("open", "ok-1")),
        # Times nurture cannot place: each is a problem of its own event.
        json.dumps(_sg("open", "t-1", timestamp=10**30)),
        f'{{"email": "{ANN}", "event": "open", "timestamp": 1e400, "sg_event_id": "t-2"}}',
        f'{{"email": "{ANN}", "event": "open", "timestamp": NaN, "sg_event_id": "t-3"}}',
        json.dumps(_sg("open", "t-4", timestamp=-1)),
        json.dumps(_sg("open", "t-5", timestamp=4_102_444_800)),  # 2100-01-01
        json.dumps(_sg("open", "t-6", timestamp="soon")),
        # Text nurture cannot store is cleaned out; the events stay.
        f'{{"email": "{ANN}", "event": "click", "timestamp": {stamp}, "sg_event_id": "c-1",'
        ' "url": "https://acme.example/\\u0000x", "useragent": "\\ud800bot", "category": ["a\\u0000", 1e999]}',
        # Over-long or odd ids are hashed, not cut: two ids sharing 200 characters stay two events.
        json.dumps(_sg("open", long_id)),
        json.dumps(_sg("open", long_id[:-1] + "y")),
        f'{{"email": "{ANN}", "event": "open", "timestamp": {stamp}, "sg_event_id": "nul\\u0000id"}}',
        # Message ids beyond any row, provider ids too long for their column: no effect, no error.
        json.dumps(_sg("delivered", "d-1", nurture_message_id=str(10**30))),
        json.dumps(_sg("processed", "p-1", nurture_message_id=str(sent.id), sg_message_id="m" * 300 + ".filter")),
    ]
    body = ("[" + ",".join(items) + "]").encode()
    answer = client.post("/webhooks/sendgrid", content=body, headers=sign(body))
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["events_stored"] == 5
    problems = result["problems"]
    assert [p.split(":")[0] for p in problems] == [f"event {i}" for i in range(1, 7)]
    assert "out of range" in problems[3]
    assert "out of range" in problems[4]
    with session_scope(world.engine) as session:
        click = session.scalars(select(Event).where(col(Event.external_id) == "c-1")).one()
        ids = set(session.scalars(select(col(Event.external_id)).where(col(Event.source) == "sendgrid")))
        settled = session.get(Message, sent.id)
    assert click.properties == {
        "url": "https://acme.example/x",
        "useragent": "\ufffdbot",
        "category": ["a", "1e999"],
    }
    assert len(ids) == 5
    assert "ok-1" in ids
    assert all(len(i) <= 200 and "\x00" not in i for i in ids)
    assert settled is not None
    assert settled.status == "sent"
    # SendGrid's retry of the same batch is recognised event by event, hashed ids included.
    again = client.post("/webhooks/sendgrid", content=body, headers=sign(body))
    assert (again.json()["events_stored"], again.json()["duplicates"]) == (0, 5)


def test_a_bounce_with_a_nul_in_its_reason_fails_its_message(client: TestClient, world: World) -> None:
    sent, _queued = _hot(world)
    reason = "550 no such user\u0000 here"
    body = json.dumps([_sg("bounce", "b-1", reason=reason, nurture_message_id=str(sent.id))]).encode()
    answer = client.post("/webhooks/sendgrid", content=body, headers=sign(body))
    assert answer.status_code == 200, answer.text
    with session_scope(world.engine) as session:
        failed = session.get(Message, sent.id)
    assert failed is not None
    assert (failed.status, failed.last_error) == ("failed", "bounce: 550 no such user here")


@pytest.mark.parametrize(
    ("body", "timestamp", "status", "detail"),
    [
        (b"[" * 100_000 + b"]" * 100_000, None, 400, "levels deep"),
        (b"[]", "9" * 400, 403, "timestamp"),
        (b"[]", "-5", 403, "timestamp"),
        (b"[]", "\u0661\u0662".encode(), 403, "timestamp"),  # Arabic-Indic digits: isdigit() says yes
        (b'[{"event": "open", "email": "a@x.example", "timestamp": 99999999999999999999}]', None, 400, "event 0"),
        (b"\xff\xfe", None, 403, "signature"),
    ],
    ids=["deep", "huge-stamp", "negative-stamp", "non-ascii-stamp", "huge-event-time", "not-utf8"],
)
def test_webhook_bodies_and_headers_that_cannot_be_used(
    client: TestClient, world: World, body: bytes, timestamp: str | bytes | None, status: int, detail: str
) -> None:
    headers: dict[str, str | bytes] = {**sign(body)}
    if timestamp is not None:
        headers[TIMESTAMP] = timestamp
    answer = client.post("/webhooks/sendgrid", content=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert detail in answer.json()["detail"]
    assert _stored(world.engine, "sendgrid") == []


def test_the_webhook_refuses_a_body_that_is_not_json(client: TestClient) -> None:
    body = b"[]"
    answer = client.post("/webhooks/sendgrid", content=body, headers=sign(body) | {"Content-Type": "text/csv"})
    assert answer.status_code == 415


@pytest.mark.parametrize("token", ["\u00e9.\u00e9", "x" * 5000 + ".y", "%00", "a.b", "\u2603", "..", "%ED%A0%80.x"])
def test_garbage_unsubscribe_tokens_are_not_found(client: TestClient, token: str) -> None:
    assert client.get(f"/unsubscribe/{token}").status_code == 404
    assert client.post(f"/unsubscribe/{token}").status_code == 404


def test_a_bug_is_a_json_500_with_a_request_id_and_a_log_line_without_the_data(
    client: TestClient, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A schema changed under the running API is a bug, not bad input: 500, logged, nothing stored."""
    world.lead(ANN, at=T0)
    with world.engine.begin() as conn:
        conn.execute(text("ALTER TABLE event DROP COLUMN properties"))
    with caplog.at_level(logging.ERROR, logger="nurture.api"):
        answer = client.post("/v1/events", content=json.dumps(GOOD).encode(), headers=AUTH)
    assert answer.status_code == 500
    request_id = answer.headers[REQUEST_ID]
    assert answer.json() == {
        "detail": "internal error: nothing was stored; quote the request id",
        "request_id": request_id,
    }
    (record,) = [r for r in caplog.records if request_id in r.getMessage()]
    assert "POST /v1/events" in record.getMessage()
    assert ANN not in record.getMessage()  # the log names the failure, not the person
    with session_scope(world.engine) as session:
        assert session.scalar(select(func.count()).select_from(text("event"))) == 0


def test_every_answer_has_a_request_id(client: TestClient) -> None:
    answers = [client.get("/healthz"), client.get("/nowhere"), client.post("/v1/events"), client.put("/healthz")]
    assert [a.status_code for a in answers] == [200, 404, 401, 405]
    assert all(len(a.headers[REQUEST_ID]) == 16 for a in answers)
    assert len({a.headers[REQUEST_ID] for a in answers}) == 4
