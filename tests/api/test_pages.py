"""What a person sees in a browser, and what a developer reads at /docs: branded pages for the unsubscribe
links (with an undo), branded HTML for bad links and unknown pages, JSON errors kept for machines, and the
OpenAPI document with the request bodies the endpoints read raw."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, update

from db.engine import session_scope
from db.inbound import suppress
from db.models import Suppression
from db.suppressions import UNDO_WINDOW
from nurture.api import create_app
from nurture.settings import Settings
from tests.api.conftest import ANN, NOW, TOKEN
from tests.api.test_unsubscribe_links import _link_path, _suppressions
from tests.conftest import T0
from tests.db.world import World

BRAND = "Acme Analytics"  # the shipped playbook's brand
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def _is_branded_page(answer: Any, status: int) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    assert BRAND in answer.text
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in answer.text


def test_unsubscribing_shows_branded_pages_and_can_be_undone(client: TestClient, world: World) -> None:
    world.mailed_hot_lead(ANN, at=T0, now=NOW)
    path = _link_path(world)
    confirm = client.get(path)
    _is_branded_page(confirm, 200)
    assert f"Press the button to stop all emails from {BRAND} to this address." in confirm.text
    assert f'<form method=post action="{path}">' in confirm.text
    assert confirm.headers["cache-control"] == "no-store"

    done = client.post(path)
    _is_branded_page(done, 200)
    assert "You are unsubscribed" in done.text
    assert f'<form method=post action="{path}/undo">' in done.text
    assert _suppressions(world) == [(ANN, "unsubscribe", "link")]
    assert [m.status for m in world.messages(ANN)] == ["sent", "cancelled"]

    undone = client.post(f"{path}/undo")
    _is_branded_page(undone, 200)
    assert "You are subscribed again" in undone.text
    assert _suppressions(world) == []
    assert [m.status for m in world.messages(ANN)] == ["sent", "cancelled"]  # what was cancelled stays so
    again = client.post(f"{path}/undo")
    _is_branded_page(again, 409)
    assert "This address stays unsubscribed" in again.text


def test_an_undo_never_lifts_a_suppression_the_link_did_not_make(client: TestClient, world: World) -> None:
    world.mailed_hot_lead(ANN, at=T0, now=NOW)
    with session_scope(world.engine) as session:
        suppress(session=session, entries=[(ANN, "spamreport")], now=NOW, source="sendgrid")
    path = _link_path(world)
    assert client.post(path).status_code == 200
    _is_branded_page(client.post(f"{path}/undo"), 409)
    assert _suppressions(world) == [(ANN, "spamreport", "sendgrid")]


def test_a_suppression_arriving_after_the_link_s_unsubscribe_is_kept_by_the_undo(
    client: TestClient, world: World
) -> None:
    world.mailed_hot_lead(ANN, at=T0, now=NOW)
    path = _link_path(world)
    assert client.post(path).status_code == 200
    with session_scope(world.engine) as session:  # the person then reports the earlier email as spam
        suppress(session=session, entries=[(ANN, "spamreport")], now=NOW, source="sendgrid")
    assert _suppressions(world) == [(ANN, "spamreport", "sendgrid")]
    _is_branded_page(client.post(f"{path}/undo"), 409)
    assert _suppressions(world) == [(ANN, "spamreport", "sendgrid")]


def test_the_undo_is_for_a_mistake_not_for_an_unsubscribe_an_hour_old(client: TestClient, world: World) -> None:
    world.mailed_hot_lead(ANN, at=T0, now=NOW)
    path = _link_path(world)
    assert client.post(path).status_code == 200
    with session_scope(world.engine) as session:
        session.execute(update(Suppression).values(at=datetime.now(UTC) - UNDO_WINDOW - timedelta(minutes=1)))
    _is_branded_page(client.post(f"{path}/undo"), 409)
    assert _suppressions(world) == [(ANN, "unsubscribe", "link")]


def test_the_links_of_previews_and_test_emails_say_so_and_unsubscribe_no_one(client: TestClient, world: World) -> None:
    world.mailed_hot_lead(ANN, at=T0, now=NOW)
    for path in ("/unsubscribe/preview", "/unsubscribe/test-send", "/unsubscribe/sample-lead"):
        for answer in (client.get(path), client.post(path)):
            _is_branded_page(answer, 200)
            assert "This is a preview" in answer.text
    assert _suppressions(world) == []


def test_a_bad_unsubscribe_link_gets_a_branded_page_not_json(client: TestClient, world: World) -> None:
    world.mailed_hot_lead(ANN, at=T0, now=NOW)
    path = _link_path(world)
    forged = path[:-4] + ("AAAA" if not path.endswith("AAAA") else "BBBB")
    for bad in ("/unsubscribe/garbage", "/unsubscribe/2.1.20514.short", forged, f"{path}x"):
        for method in (client.get, client.post):
            answer = method(bad)
            _is_branded_page(answer, 404)
            assert "This link does not work" in answer.text
            assert "This unsubscribe link is not valid" in answer.text
        _is_branded_page(client.post(f"{bad}/undo"), 404)
    assert _suppressions(world) == []
    _is_branded_page(client.get("/unsubscribe"), 404)
    wrong_method = client.put(path)
    _is_branded_page(wrong_method, 405)


def test_unknown_pages_are_branded_for_browsers_and_json_for_programs(client: TestClient) -> None:
    page = client.get("/no/such/page", headers=BROWSER)
    _is_branded_page(page, 404)
    assert "Page not found" in page.text
    program = client.get("/no/such/page")
    assert (program.status_code, program.json()) == (404, {"detail": "Not Found"})
    # The machines' endpoints answer JSON whoever asks.
    for answer in (
        client.get("/v1/events", headers=BROWSER),
        client.post("/v1/events", headers=BROWSER, json={}),
        client.post("/webhooks/sendgrid", headers=BROWSER, content=b"[]"),
    ):
        assert answer.headers["content-type"] == "application/json", answer.text
        assert "detail" in answer.json()


def test_the_pages_carry_no_brand_when_the_playbook_cannot_be_read(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    settings = Settings(nurture_database_url=database_url, nurture_playbook=tmp_path / "missing.yaml")
    with TestClient(create_app(settings)) as client:
        answer = client.get("/unsubscribe/garbage")
        assert answer.status_code == 404
        assert "This link does not work" in answer.text
        assert BRAND not in answer.text
        assert client.get("/healthz").json() == {"status": "ok"}


def _resolved(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        prefix = "#/components/schemas/"
        assert schema["$ref"].startswith(prefix)
        schema = document["components"]["schemas"][schema["$ref"].removeprefix(prefix)]
    return schema


def test_the_api_documents_itself_at_docs(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs.text
    document = client.get("/openapi.json").json()
    paths = document["paths"]
    assert set(paths) >= {"/webhooks/sendgrid", "/v1/events", "/unsubscribe/{token}", "/unsubscribe/{token}/undo"}

    def body_schema(path: str) -> dict[str, Any]:
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is True
        return _resolved(document, body["content"]["application/json"]["schema"])

    events = body_schema("/v1/events")
    one, batch = (_resolved(document, option) for option in events["anyOf"])
    assert set(one["required"]) == {"email", "kind"}
    assert set(one["properties"]) == {"email", "kind", "occurred_at", "id", "properties"}
    assert _resolved(document, batch["properties"]["events"]["items"]) == one
    webhook = body_schema("/webhooks/sendgrid")
    assert webhook["type"] == "array"
    item = _resolved(document, webhook["items"])
    assert {"event", "timestamp"} <= set(item["required"])
    assert {"sg_event_id", "nurture_message_id", "email"} <= set(item["properties"])
    headers = {p["name"] for p in paths["/webhooks/sendgrid"]["post"]["parameters"]}
    assert headers == {"X-Twilio-Email-Event-Webhook-Signature", "X-Twilio-Email-Event-Webhook-Timestamp"}
    # The unsubscribe POSTs take no body: RFC 8058's one-click sends a form field nurture does not need.
    assert "requestBody" not in paths["/unsubscribe/{token}"]["post"]


def test_the_documented_schemas_do_not_change_what_the_endpoints_accept(client: TestClient) -> None:
    """The bodies are still read raw: a batch keeps its good items and lists the bad ones, as before."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    mixed = client.post(
        "/v1/events", headers=auth, json={"events": [{"email": ANN, "kind": "page_view"}, {"email": ANN}]}
    )
    assert mixed.status_code == 200
    assert mixed.json()["accepted"] == 1
    assert [e["index"] for e in mixed.json()["errors"]] == [1]
    assert client.post("/v1/events", headers=auth, content=b"{oops").status_code == 400


def test_a_person_can_stop_only_the_series_and_stay_subscribed(client: TestClient, world: World) -> None:
    world.mailed_hot_lead(ANN, at=T0, now=NOW)  # the demo offer sent, the sales hand-off queued
    path = _link_path(world)
    confirm = client.get(path)
    assert f'<form method=post action="{path}/series">' in confirm.text
    stopped = client.post(f"{path}/series")
    _is_branded_page(stopped, 200)
    assert "This series is stopped" in stopped.text
    assert f'<form method=post action="{path}">' in stopped.text  # unsubscribing stays one press away
    assert _suppressions(world) == []
    assert [m.status for m in world.messages(ANN)] == ["sent", "cancelled"]
    assert [(e.state, e.exit_reason) for e in world.enrollments(ANN)] == [
        ("exited", "stopped by the person (unsubscribe page)")
    ]
    assert world.dispatch(NOW + timedelta(days=3)).claimed == 0
    # Nothing left to stop: the page offers only the unsubscribe.
    assert "/series" not in client.get(path).text
    _is_branded_page(client.post("/unsubscribe/garbage/series"), 404)
