"""Outbound webhooks on both engines: a lead turning hot in a real cycle reaches a loopback receiver, signed;
replays enqueue nothing twice; retries, backoff and the dead letter; an operator's retry; a failed email told."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine

from db.engine import session_scope
from db.models import StageTransition, WebhookDelivery
from db.reports import explain_lead
from db.webhooks import DeliveryStatus
from flows.webhooks import HttpPoster, WebhookResult, announce_transitions, deliver_webhooks
from nurture.playbook import Playbook, Stage, parse_playbook
from nurture.sequences import Transition
from nurture.timeline import entries
from tests.cli.runner import run_nurture
from tests.conftest import PLAYBOOK_PATH, T0, TEMPLATES_DIR
from tests.db.world import World
from tests.fakes.webhook_receiver import Receiver, documented_verifier, webhook_receiver

NOW = T0 + timedelta(minutes=10)
SECRET = "whsec-test-7f3a"
ANN = "ann@northwind.example"


def _playbook(hooks: str) -> Playbook:
    return parse_playbook(PLAYBOOK_PATH.read_text() + "\nwebhooks:\n" + hooks)


def _deliver(world: World, now: datetime, secrets: dict[str, str]) -> WebhookResult:
    poster = HttpPoster(timeout=5)
    try:
        return deliver_webhooks(
            engine=world.engine, secrets=secrets, now=now, clock=lambda: datetime.now(UTC), poster=poster
        )
    finally:
        poster.close()


def _deliveries(world: World) -> list[WebhookDelivery]:
    return world.all(WebhookDelivery)


def _hot(world: World, email: str = ANN) -> None:
    world.lead(
        email, at=T0, first_name="Ann", last_name="Smith", company="Northwind", job_title="CTO", company_size=500
    )
    world.events(email, ("demo_request", T0), ("webinar_attended", T0), ("pricing_view", T0))
    world.advance(NOW)


def test_a_lead_turning_hot_reaches_the_receiver_signed_with_its_profile_and_score_breakdown(engine: Engine) -> None:
    with webhook_receiver() as receiver:
        playbook = _playbook(
            f"  - name: sales\n    url: {receiver.url}/hooks/sales\n    events: [lead.transitioned]\n    to: hot\n"
            f"  - name: finance\n    url: {receiver.url}/hooks/finance\n    events: [lead.transitioned]\n"
            "    to: [customer]\n"
        )
        world = World(engine, playbook)
        _hot(world)
        assert world.transitions(ANN) == [("cold", "hot")]
        (queued,) = _deliveries(world)  # finance wants customers only
        assert (queued.webhook, queued.status, queued.event) == ("sales", "queued", "lead.transitioned")

        result = _deliver(world, NOW, {"sales": SECRET, "finance": "other"})

    assert result.by_status == {"delivered": 1}
    (request,) = receiver.requests
    assert request.path == "/hooks/sales"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["nurture-event"] == "lead.transitioned"
    verify = documented_verifier()
    signature = request.headers["nurture-signature"]
    assert verify(SECRET, request.body, signature)
    assert not verify("not-the-secret", request.body, signature)
    assert not verify(SECRET, request.body.replace(b'"hot"', b'"warm"'), signature)

    body = json.loads(request.body)
    lead = world.row(ANN)
    (transition,) = world.all(StageTransition)
    assert body["event"] == "lead.transitioned"
    assert body["delivery_id"] == request.delivery_id == queued.delivery_id
    assert body["playbook_version"] == playbook.version
    assert {k: body["lead"][k] for k in ("id", "email", "name", "company", "job_title", "company_size", "stage")} == {
        "id": lead.id,
        "email": ANN,
        "name": "Ann Smith",
        "company": "Northwind",
        "job_title": "CTO",
        "company_size": 500,
        "stage": "hot",
    }
    assert body["lead"]["score"] == round(lead.score, 4)
    assert body["lead"]["fit_score"] == round(lead.fit_score, 4)
    assert body["transition"] == {
        "id": transition.id,
        "from": "cold",
        "to": "hot",
        "at": NOW.isoformat().replace("+00:00", "Z"),
        "reason": transition.reason,
    }
    breakdown = body["score_breakdown"]
    assert any(rule.startswith("event: demo_request") for rule in breakdown), breakdown
    # The lead's first score change: its rules add up to the whole score.
    assert abs(sum(breakdown.values()) - lead.score) < 1e-3

    (delivered,) = _deliveries(world)
    assert (delivered.status, delivered.attempts, delivered.response_status) == ("delivered", 1, 200)
    assert delivered.delivered_at is not None
    # `nurture explain` tells the story: the lead turned hot, and sales was told.
    with session_scope(engine, commit=False) as session:
        story = explain_lead(session=session, email=ANN, playbook=playbook, now=NOW)
    assert story is not None
    assert [(w["webhook"], w["event"], w["status"]) for w in story["webhooks"]] == [
        ("sales", "lead.transitioned", "delivered")
    ]
    lines = [e.text for e in entries(story)]
    assert lines.index("↗ webhook sales told lead.transitioned: delivered") > next(
        i for i, text in enumerate(lines) if text.startswith("▶ cold → hot")
    )


def test_a_cycle_run_again_or_a_transition_announced_twice_enqueues_one_delivery(engine: Engine) -> None:
    playbook = _playbook("  - url: https://crm.example/hooks\n    events: [lead.transitioned]\n")
    world = World(engine, playbook)
    _hot(world)
    world.advance(NOW)  # the same cycle again
    world.advance(NOW + timedelta(minutes=10))  # and the next one
    assert len(_deliveries(world)) == 1
    (row,) = world.all(StageTransition)
    assert row.id is not None
    # A chunk retried after its commit (or a replay) announces the same transition again: nothing new.
    with session_scope(engine) as session:
        from db.cycle import ChunkResult

        again = announce_transitions(
            session=session,
            transitions=[Transition(row.lead_id, Stage.cold, Stage.hot, row.id)],
            reasons=[row.reason],
            playbook=playbook,
            now=NOW,
            result=ChunkResult(),
        )
    assert again == 0
    assert len(_deliveries(world)) == 1
    assert _deliveries(world)[0].webhook == "webhook-1"


def _scripted(refusing: dict[str, bool]) -> Receiver:
    def answer(path: str, count: int) -> int:
        if path == "/flaky":
            return 500 if count == 1 else 200
        return 400 if refusing["on"] else 200

    return Receiver(answer)


def test_a_5xx_is_retried_after_a_backoff_a_4xx_is_dead_at_once_and_an_operator_requeues_the_dead(
    engine: Engine, database_url: str
) -> None:
    refusing = {"on": True}
    scripted = _scripted(refusing)
    with webhook_receiver(scripted.answer) as receiver:
        playbook = _playbook(
            f"  - name: flaky\n    url: {receiver.url}/flaky\n    events: [lead.transitioned]\n"
            f"  - name: strict\n    url: {receiver.url}/strict\n    events: [lead.transitioned]\n"
        )
        world = World(engine, playbook)
        _hot(world)
        secrets = {"flaky": SECRET, "strict": SECRET}

        first = _deliver(world, NOW, secrets)
        assert first.by_status == {"failed": 1, "dead": 1}
        rows = {r.webhook: r for r in _deliveries(world)}
        flaky, strict = rows["flaky"], rows["strict"]
        assert (flaky.status, flaky.attempts, flaky.response_status) == ("failed", 1, 500)
        assert NOW < flaky.due_at <= NOW + timedelta(hours=1)
        assert (strict.status, strict.response_status) == ("dead", 400)
        assert (strict.last_error or "").startswith("refused (HTTP 400")

        assert _deliver(world, NOW, secrets).by_status == {}  # the retry is not due yet; the dead stays dead
        assert _deliver(world, NOW + timedelta(hours=2), secrets).by_status == {"delivered": 1}
        assert {r.webhook: r.status for r in _deliveries(world)} == {"flaky": "delivered", "strict": "dead"}

        listed = run_nurture("messages", "list", "--webhooks", "--json", env={"NURTURE_DATABASE_URL": database_url})
        assert [(d["webhook"], d["status"], d["response_status"]) for d in json.loads(listed.stdout)] == [
            ("strict", "dead", 400)
        ]
        # The on-call engineer's first look says so too, with what to run.
        status = run_nurture("status", "--json", env={"NURTURE_DATABASE_URL": database_url})
        assert json.loads(status.stdout)["webhooks_by_status"] == {"dead": 1, "delivered": 1}
        shown = " ".join(run_nurture("status", env={"NURTURE_DATABASE_URL": database_url}).stdout.split())
        assert "1 webhook deliveries are dead or in doubt: see `nurture messages list --webhooks`" in shown
        refusing["on"] = False  # the receiver's owner fixed it
        retried = run_nurture("messages", "retry", "--webhooks", "--yes", env={"NURTURE_DATABASE_URL": database_url})
        assert "1 webhook deliveries queued again" in retried.stdout
        assert _deliver(world, datetime.now(UTC), secrets).by_status == {"delivered": 1}

    per_path = Counter((r.path, r.delivery_id) for r in receiver.requests)
    assert sorted(per_path.values()) == [2, 2], "each delivery was tried twice, with its one delivery id"
    assert {r.webhook: r.status for r in _deliveries(world)} == {"flaky": "delivered", "strict": "delivered"}
    verify = documented_verifier()
    assert all(verify(SECRET, r.body, r.headers["nurture-signature"]) for r in receiver.requests)


def test_forgetting_a_lead_erases_its_deliveries(engine: Engine) -> None:
    from db.inbound import forget_lead

    world = World(engine, _playbook("  - url: https://crm.example/hooks\n    events: [lead.transitioned]\n"))
    _hot(world)
    _hot(world, "bob@northwind.example")
    assert len(_deliveries(world)) == 2
    with session_scope(engine) as session:
        assert forget_lead(session=session, email=ANN, now=NOW).lead_found
    (left,) = _deliveries(world)
    assert left.payload["lead"]["email"] == "bob@northwind.example"


def test_a_delivery_whose_webhook_left_the_playbook_is_dead_not_sent_unsigned(engine: Engine) -> None:
    with webhook_receiver() as receiver:
        world = World(
            engine, _playbook(f"  - name: old\n    url: {receiver.url}/old\n    events: [lead.transitioned]\n")
        )
        _hot(world)
        result = _deliver(world, NOW, {})  # the webhook was removed: no secret for it
    assert result.by_status == {"dead": 1}
    assert receiver.requests == []
    (row,) = _deliveries(world)
    assert row.last_error == "webhook 'old' is no longer in the playbook: not sent"


def test_a_failed_email_is_told_in_the_transaction_that_records_its_failure(engine: Engine, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    (templates / "demo_offer.html").write_text(
        '{% extends "_layout.html" %}{% block body %}{{ lead.nickname }}{% endblock %}'
    )
    with webhook_receiver() as receiver:
        playbook = _playbook(f"  - name: ops\n    url: {receiver.url}/ops\n    events: [message.failed]\n")
        world = World(engine, playbook, templates=templates)
        _hot(world)
        assert _deliveries(world) == []  # a transition, but this webhook is not told about those
        assert world.dispatch(NOW).by_status == {"failed": 1}
        (row,) = _deliveries(world)
        assert (row.event, row.status) == ("message.failed", DeliveryStatus.queued)
        assert _deliver(world, NOW, {"ops": SECRET}).by_status == {"delivered": 1}
    body = json.loads(receiver.requests[0].body)
    (message,) = world.messages(ANN)
    assert body["event"] == "message.failed"
    assert body["message"]["id"] == message.id
    assert body["message"]["sequence"] == message.sequence
    assert body["message"]["step"] == message.step_id
    assert "template error" in body["message"]["error"]
    assert body["lead"]["email"] == ANN
