"""Unsubscribe links over HTTP: bound to the address they were sent to, dated, and kept working across a key
rotation and from before links were dated (version 1)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlmodel import col, select

from db.engine import session_scope
from db.models import Lead, Suppression
from nurture.api import create_app
from nurture.settings import Settings
from nurture.transports import InMemoryTransport
from nurture.unsubscribe import make_unsubscribe_token
from tests.api.conftest import ANN, NOW
from tests.conftest import T0
from tests.db.world import SENDER, World


def _link_path(world: World) -> str:
    """The path of the unsubscribe link in the last email sent."""
    assert isinstance(world.transport, InMemoryTransport)
    return world.transport.sent[-1].unsubscribe_url.removeprefix(SENDER.public_url)


def _suppressions(world: World) -> list[tuple[str | None, str, str]]:
    with session_scope(world.engine) as session:
        return [(row.email, row.reason, row.source) for row in session.scalars(select(Suppression))]


def _client(database_url: str, **keys: str) -> TestClient:
    settings = Settings(nurture_database_url=database_url, **keys)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def _v1(lead_id: int, secret: str) -> str:
    """A token as nurture made them before links were dated."""
    payload = base64.urlsafe_b64encode(str(lead_id).encode()).decode().rstrip("=")
    digest = hmac.new(secret.encode(), b"unsubscribe:" + payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(digest[:18]).decode().rstrip('=')}"


def test_a_link_whose_lead_id_now_belongs_to_another_address_is_refused(client: TestClient, world: World) -> None:
    """The link names a lead id; if that id ever holds another person (an id reused after an erasure, a
    restored backup), the link must not unsubscribe them: it is signed for the address it was sent to."""
    lead_id = world.mailed_hot_lead(ANN, at=T0, now=NOW)
    path = _link_path(world)
    with session_scope(world.engine) as session:
        session.execute(update(Lead).where(col(Lead.id) == lead_id).values(email="cara@elsewhere.example"))
    for method in (client.get, client.post):
        answer = method(path)
        assert answer.status_code == 404, answer.text
        assert "not valid" in answer.text
    assert _suppressions(world) == []
    assert [m.status for m in world.messages("cara@elsewhere.example")] == ["sent", "queued"]


def test_links_signed_before_a_key_rotation_keep_working(database_url: str, world: World) -> None:
    world.mailed_hot_lead(ANN, at=T0, now=NOW)
    path = _link_path(world)  # signed with the key of the time, SENDER's
    with _client(database_url, nurture_secret_key="the new key") as forgot_the_old_key:
        assert forgot_the_old_key.post(path).status_code == 404
    assert _suppressions(world) == []
    with _client(
        database_url, nurture_secret_key="the new key", nurture_secret_key_previous=f"an older key,{SENDER.secret_key}"
    ) as rotated:
        assert rotated.get(path).status_code == 200
        assert rotated.post(path).status_code == 200
    assert _suppressions(world) == [(ANN, "unsubscribe", "link")]
    assert [m.status for m in world.messages(ANN)] == ["sent", "cancelled"]


def test_a_version_1_link_from_an_old_email_still_unsubscribes(database_url: str, world: World) -> None:
    lead_id = world.mailed_hot_lead(ANN, at=T0, now=NOW)
    with _client(database_url, nurture_secret_key="the new key") as client:
        assert client.post(f"/unsubscribe/{_v1(lead_id, 'a key nobody has')}").status_code == 404
    with _client(database_url, nurture_secret_key="the new key", nurture_secret_key_previous="the old key") as client:
        assert client.post(f"/unsubscribe/{_v1(lead_id, 'the old key')}").status_code == 200
    assert _suppressions(world) == [(ANN, "unsubscribe", "link")]


def test_an_expired_link_still_unsubscribes_and_says_it_is_old(database_url: str, world: World) -> None:
    """Past NURTURE_UNSUBSCRIBE_LINK_DAYS an authentic link still works: stopping mail never harms the person,
    and refusing would leave them with the spam button."""
    lead_id = world.mailed_hot_lead(ANN, at=T0, now=NOW)
    # The API reads the clock, so the link is dated from today.
    old = make_unsubscribe_token(lead_id, email=ANN, now=datetime.now(UTC) - timedelta(days=61), secret="k")
    recent = make_unsubscribe_token(lead_id, email=ANN, now=datetime.now(UTC) - timedelta(days=59), secret="k")
    with _client(database_url, nurture_secret_key="k", nurture_unsubscribe_link_days="60") as client:
        assert "days old" not in client.get(f"/unsubscribe/{recent}").text
        page = client.get(f"/unsubscribe/{old}")
        assert page.status_code == 200
        assert "This link is from an email more than 60 days old, and it still works." in page.text
        assert "<form method=post" in page.text
        assert _suppressions(world) == []
        assert client.post(f"/unsubscribe/{old}").status_code == 200
    assert _suppressions(world) == [(ANN, "unsubscribe", "expired link")]
    assert [m.status for m in world.messages(ANN)] == ["sent", "cancelled"]
