"""The API under lock contention (PostgreSQL): it queues behind a cycle, never deadlocks with it, and
answers 503 with Retry-After, storing nothing, when locks are held longer than it waits."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text
from sqlmodel import col

from db.engine import session_scope
from db.imports import add_events
from db.models import Event, Lead
from nurture.api import REQUEST_ID, create_app
from nurture.importing import EventRecord
from nurture.settings import Settings
from tests.api.conftest import TOKEN
from tests.conftest import T0
from tests.db.world import World

AUTH = {"Authorization": f"Bearer {TOKEN}"}
LEADS = ["ann@x.example", "bob@x.example"]


def _postgres_only(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("row locks are PostgreSQL's; SQLite writers queue on one database lock")


def _lead_ids(world: World) -> list[int]:
    for email in LEADS:
        world.lead(email, at=T0)
    with session_scope(world.engine) as session:
        return [int(i) for i in session.scalars(select(col(Lead.id)).order_by(col(Lead.id))) if i is not None]


def _wait_for_lock_wait(engine: Engine, not_pid: int) -> None:
    with engine.connect() as watcher:
        for _ in range(1000):
            query = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> :pid")
            if watcher.execute(query, {"pid": not_pid}).scalar():
                return
            watcher.rollback()  # pg_stat_activity is a snapshot per transaction
            time.sleep(0.01)
    raise AssertionError("the API never waited for the lead lock")


def test_an_events_batch_queues_behind_a_cycle_instead_of_deadlocking_with_it(client: TestClient, world: World) -> None:
    """The cycle locks a chunk's leads in id order (SELECT ... FOR UPDATE); a batch naming them in the
    other order must not hold the second while waiting for the first."""
    _postgres_only(world.engine)
    first, second = _lead_ids(world)
    answers: list[Any] = []
    body = {"events": [{"email": email, "kind": "page_view", "id": f"pv-{email}"} for email in reversed(LEADS)]}

    def send() -> None:
        try:
            answers.append(client.post("/v1/events", json=body, headers=AUTH))
        except BaseException as exc:
            answers.append(exc)
            raise

    post = threading.Thread(target=send)
    with world.engine.begin() as cycle:
        # The cycle looks for deadlocks first, so a deadlock would fail it, not the API.
        cycle.execute(text("SET LOCAL deadlock_timeout = '50ms'"))
        cycle.execute(select(col(Lead.id)).where(col(Lead.id) == first).with_for_update())
        post.start()
        _wait_for_lock_wait(world.engine, not_pid=int(cycle.execute(text("SELECT pg_backend_pid()")).scalar_one()))
        cycle.execute(select(col(Lead.id)).where(col(Lead.id) == second).with_for_update())
    post.join()
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 2


def test_locks_held_longer_than_the_api_waits_get_503_and_nothing_is_stored(settings: Settings, world: World) -> None:
    _postgres_only(world.engine)
    first, _ = _lead_ids(world)
    impatient = settings.model_copy(update={"nurture_api_lock_timeout_seconds": 0.1})
    body = json.dumps({"email": LEADS[0], "kind": "unsubscribe", "id": "u-1"}).encode()
    with TestClient(create_app(impatient)) as client:
        with world.engine.begin() as holder:
            holder.execute(select(col(Lead.id)).where(col(Lead.id) == first).with_for_update())
            answer = client.post("/v1/events", content=body, headers=AUTH)
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "2"
        assert "lock wait timed out" in answer.json()["detail"]
        assert answer.json()["request_id"] == answer.headers[REQUEST_ID]
        with session_scope(world.engine) as session:
            assert session.scalars(select(Event).where(col(Event.source) == "api")).all() == []
        # Sent again once the lock is gone, it is stored, once.
        again = client.post("/v1/events", content=body, headers=AUTH)
        assert again.status_code == 200, again.text
        assert (again.json()["accepted"], again.json()["suppressions_added"]) == (1, 1)


def test_a_lead_created_meanwhile_by_another_request_is_not_counted_as_created_by_this_one(
    client: TestClient, world: World
) -> None:
    """Two requests name the same new address at once: both store their event, only one answer says
    it created the lead (the other's insert waited, then found it)."""
    _postgres_only(world.engine)
    answers: list[Any] = []
    body = {"email": "new@x.example", "kind": "page_view", "id": "pv-new"}
    post = threading.Thread(target=lambda: answers.append(client.post("/v1/events", json=body, headers=AUTH)))
    with session_scope(world.engine) as other:
        created = add_events(
            session=other,
            records=[EventRecord(1, "new@x.example", "form_submit", T0, {}, "fs-new")],
            now=T0,
            source="api",
        )
        post.start()
        _wait_for_lock_wait(world.engine, not_pid=int(other.execute(text("SELECT pg_backend_pid()")).scalar_one()))
    post.join()
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    assert (created.leads_created, answer.json()["leads_created"]) == (1, 0)
    assert answer.json()["accepted"] == 1
