"""The nurture-cycle flow hands a hot lead to sales: a signed webhook on loopback, and a Prefect event with the
same content, whose personal data is there only when NURTURE_PREFECT_EVENTS_PERSONAL_DATA says so."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import flows.chunks
from db.engine import get_engine, upgrade_schema
from flows.cycle import nurture_cycle
from flows.runtime import reset_runtime
from nurture.playbook import parse_playbook
from tests.conftest import PLAYBOOK_PATH, T0
from tests.db.world import World
from tests.fakes.webhook_receiver import documented_verifier, webhook_receiver

SECRET = "whsec-flow-test"


def _hot_lead(world: World, email: str, first_name: str) -> None:
    world.lead(email, at=T0, first_name=first_name, company="Northwind", job_title="CTO", company_size=500)
    world.events(email, ("demo_request", T0), ("webinar_attended", T0), ("pricing_view", T0))


def test_a_cycle_delivers_the_hand_off_and_emits_events_private_by_default(
    prefect_api: str, nurture_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emitted: list[dict[str, Any]] = []
    monkeypatch.setattr(flows.chunks, "emit_event", lambda **kw: emitted.append(kw))
    with webhook_receiver() as receiver:
        text = PLAYBOOK_PATH.read_text() + (
            f"\nwebhooks:\n  - name: sales\n    url: {receiver.url}/sales\n"
            "    events: [lead.transitioned, lead.converted]\n    to: hot\n"
        )
        (tmp_path / "nurture.yaml").write_text(text)
        monkeypatch.setenv("NURTURE_PLAYBOOK", str(tmp_path / "nurture.yaml"))
        monkeypatch.setenv("NURTURE_WEBHOOK_SECRET", SECRET)
        reset_runtime()
        engine = get_engine(nurture_env["NURTURE_DATABASE_URL"])
        upgrade_schema(engine)
        world = World(engine, parse_playbook(text))
        _hot_lead(world, "ann@northwind.example", "Ann")

        first = nurture_cycle(now=T0 + timedelta(minutes=10))
        assert first["transitions"] == {"cold→hot": 1}
        assert first["webhooks"] == {"delivered": 1}

        monkeypatch.setenv("NURTURE_PREFECT_EVENTS_PERSONAL_DATA", "true")
        reset_runtime()
        _hot_lead(world, "bob@northwind.example", "Bob")
        second = nurture_cycle(now=T0 + timedelta(minutes=20))
        assert second["webhooks"] == {"delivered": 1}

    verify = documented_verifier()
    assert [json.loads(r.body)["lead"]["email"] for r in receiver.requests] == [
        "ann@northwind.example",
        "bob@northwind.example",
    ]
    assert all(verify(SECRET, r.body, r.headers["nurture-signature"]) for r in receiver.requests)

    private, shared = (e for e in emitted if e["event"] == "nurture.lead.transitioned")
    hook_body = json.loads(receiver.requests[0].body)
    assert private["resource"]["nurture.stage"] == "hot"
    assert private["resource"]["nurture.stage.from"] == "cold"
    assert private["payload"]["lead"] == {k: hook_body["lead"][k] for k in private["payload"]["lead"]}
    assert set(private["payload"]["lead"]) == {"id", "stage", "score", "fit_score", "engagement"}
    assert private["payload"]["score_breakdown"] == hook_body["score_breakdown"]
    assert private["payload"]["transition"] == hook_body["transition"]
    text_of_private = json.dumps(private)
    for personal in ("ann@northwind.example", "Ann", "Northwind", "CTO"):
        assert personal not in text_of_private, personal
    assert shared["payload"]["lead"]["email"] == "bob@northwind.example"
    assert shared["payload"]["lead"]["company"] == "Northwind"
    assert shared["payload"]["lead"]["name"] == "Bob"
