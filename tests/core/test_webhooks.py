"""Outbound webhooks in the core: the playbook's section, who is told what, the signature, what a response means."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from nurture.errors import PlaybookError
from nurture.playbook import Stage, parse_playbook
from nurture.webhooks import (
    Attempt,
    DeliveryStatus,
    LeadFacts,
    WebhookEvent,
    conversion_fact,
    encode,
    event_payload,
    missing_secrets,
    plan_deliveries,
    signature,
    transition_fact,
)
from tests.conftest import PLAYBOOK_PATH
from tests.fakes.webhook_receiver import documented_verifier

SHIPPED = PLAYBOOK_PATH.read_text()
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
LEAD = LeadFacts(
    id=7,
    email="ann@northwind.example",
    first_name="Ann",
    last_name="Smith",
    company="Northwind",
    job_title="CTO",
    company_size=500,
    country="DE",
    timezone="Europe/Berlin",
    attributes={"industry": "logistics"},
    stage="hot",
    score=80.5,
    fit_score=35.0,
    engagement=45.5,
    breakdown={"fit: job_title": 20.0, "event: demo_request": 60.5},
)


def _hooks(text: str) -> str:
    return SHIPPED + "\nwebhooks:\n" + text


def test_a_webhook_section_loads_with_names_events_and_stages() -> None:
    playbook = parse_playbook(
        _hooks(
            "  - url: https://crm.example/a\n    events: [lead.transitioned, lead.converted]\n    to: hot\n"
            "  - name: ops\n    url: https://ops.example/b\n    events: [message.failed]\n    secret_env: OPS_SECRET\n"
        )
    )
    (first, a), (second, b) = playbook.named_webhooks()
    assert (first, a.to, a.events) == ("webhook-1", (Stage.hot,), (WebhookEvent.transitioned, WebhookEvent.converted))
    assert (second, b.secret_env) == ("ops", "OPS_SECRET")
    assert missing_secrets(playbook, {"NURTURE_WEBHOOK_SECRET": "x"}) == ["OPS_SECRET"]
    assert missing_secrets(playbook, {"NURTURE_WEBHOOK_SECRET": "x", "OPS_SECRET": "y"}) == []


@pytest.mark.parametrize(
    ("hook", "expected", "at"),
    [
        (
            "  - url: crm.example/hooks\n    events: [lead.converted]\n",
            "webhooks.0.url: 'crm.example/hooks' is not a",
            "url:",
        ),
        (
            "  - url: https://u:p@crm.example/\n    events: [lead.converted]\n",
            "carries a user name or password",
            "url:",
        ),
        (
            "  - url: https://crm.example/\n    events: [lead.hot]\n",
            "webhooks.0.events.0: 'lead.hot' is not a webhook event",
            "events:",
        ),
        (
            "  - url: https://crm.example/\n    events: [lead.transitioned]\n    to: [warm, hott]\n",
            "webhooks.0.to.1: 'hott' is not a stage (did you mean 'hot'?)",
            "to:",
        ),
        ("  - url: https://crm.example/\n    events: []\n", "webhooks.0.events: lists no event", "events:"),
        (
            "  - url: https://crm.example/\n    events: [lead.converted]\n    secret_env: my-secret\n",
            "webhooks.0.secret_env: 'my-secret' is not an environment variable name",
            "secret_env:",
        ),
        (
            "  - {name: a, url: 'https://x.example/', events: [lead.converted]}\n"
            "  - {name: a, url: 'https://y.example/', events: [lead.converted]}\n",
            "two webhooks are named 'a'",
            "webhooks:",
        ),
    ],
)
def test_a_bad_webhook_is_refused_at_its_line(hook: str, expected: str, at: str) -> None:
    text = _hooks(hook)
    with pytest.raises(PlaybookError) as caught:
        parse_playbook(text)
    (problem,) = caught.value.problems
    assert expected in problem
    section = len(SHIPPED.splitlines()) + 1
    line = section + next(i for i, row in enumerate(text.splitlines()[section:]) if at in row) + 1
    assert problem.startswith(f"nurture.yaml:{line}: "), (problem, line)


def test_to_filters_transitions_by_the_stage_entered_and_each_receiver_gets_its_own_key() -> None:
    playbook = parse_playbook(
        _hooks(
            "  - {name: sales, url: 'https://crm.example/a', events: [lead.transitioned], to: hot}\n"
            "  - {name: all, url: 'https://dw.example/b', events: [lead.transitioned, lead.converted]}\n"
        )
    )
    hot = transition_fact(
        LEAD, transition_id=3, from_stage=Stage.cold, to_stage=Stage.hot, at=NOW, reason="score 80 reached hot"
    )
    warm = transition_fact(LEAD, transition_id=4, from_stage=Stage.hot, to_stage=Stage.warm, at=NOW, reason="r")
    converted = conversion_fact(
        LEAD, enrollment_id=9, sequence="hot_lead", goal="demo_request", at=NOW, after_step="demo"
    )
    planned = plan_deliveries([hot, warm, converted], playbook=playbook, now=NOW)
    assert [(p.webhook, p.event.value, p.payload.get("transition", {}).get("to")) for p in planned] == [
        ("sales", "lead.transitioned", "hot"),
        ("all", "lead.transitioned", "hot"),
        ("all", "lead.transitioned", "warm"),
        ("all", "lead.converted", None),
    ]
    assert len({p.idempotency_key for p in planned}) == len({p.delivery_id for p in planned}) == 4
    again = plan_deliveries([hot], playbook=playbook, now=NOW + timedelta(hours=1))
    assert [p.delivery_id for p in again] == [p.delivery_id for p in planned[:2]], "a replay has the same ids"
    assert planned[3].payload["conversion"] == {
        "enrollment_id": 9,
        "sequence": "hot_lead",
        "goal": "demo_request",
        "at": "2026-03-02T09:00:00Z",
        "after_step": "demo",
    }
    assert planned[0].payload["score_breakdown"] == {"fit: job_title": 20.0, "event: demo_request": 60.5}


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body_and_the_documented_snippet_checks_it() -> None:
    body = encode({"b": 1, "a": "é"})
    assert body == '{"a":"é","b":1}'.encode()
    now = int(datetime.now(UTC).timestamp())
    header = signature("s3cret", now, body)
    expected = hmac.new(b"s3cret", f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    assert header == f"t={now},v1={expected}"
    verify = documented_verifier()
    assert verify("s3cret", body, header)
    assert not verify("s3cret", body + b" ", header)
    assert not verify("other", body, header)
    assert not verify("s3cret", body, signature("s3cret", now - 3600, body)), "an old signature is a replay"
    assert not verify("s3cret", body, "garbage")


def test_prefect_event_payloads_leave_out_who_the_lead_is_unless_allowed() -> None:
    fact = transition_fact(LEAD, transition_id=3, from_stage=Stage.cold, to_stage=Stage.hot, at=NOW, reason="r")
    private = event_payload(fact, playbook_version="v1", personal_data=False)
    text = json.dumps(private)
    for personal in ("ann@northwind.example", "Ann", "Smith", "Northwind", "CTO", "logistics", "Europe/Berlin"):
        assert personal not in text
    assert private["lead"] == {"id": 7, "stage": "hot", "score": 80.5, "fit_score": 35.0, "engagement": 45.5}
    assert private["score_breakdown"] == {"fit: job_title": 20.0, "event: demo_request": 60.5}
    assert private["transition"]["to"] == "hot"
    shared = event_payload(fact, playbook_version="v1", personal_data=True)
    assert shared["lead"]["email"] == "ann@northwind.example"
    assert shared["lead"]["attributes"] == {"industry": "logistics"}


def _judge(attempt: Attempt, attempts: int = 1) -> tuple[DeliveryStatus, timedelta, str | None]:
    from nurture.webhooks import judge

    outcome = judge(attempt, attempts=attempts, now=NOW, rng=random.Random(1))
    return outcome.status, outcome.due_at - NOW, outcome.error


@pytest.mark.parametrize("code", [200, 201, 204])
def test_2xx_is_delivered(code: int) -> None:
    assert _judge(Attempt(code))[0] == DeliveryStatus.delivered


@pytest.mark.parametrize("code", [500, 502, 503, 408, 429])
def test_5xx_408_and_429_are_retried_later_then_dead_after_the_last_attempt(code: int) -> None:
    status, wait, error = _judge(Attempt(code, error="busy"))
    assert status == DeliveryStatus.failed
    assert timedelta(seconds=1) <= wait <= timedelta(hours=1)
    assert error == f"HTTP {code}: busy"
    status, _, error = _judge(Attempt(code), attempts=8)
    assert status == DeliveryStatus.dead
    assert (error or "").startswith("gave up after 8 attempts")


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 422, 301, 302])
def test_other_answers_are_dead_at_once(code: int) -> None:
    status, _, error = _judge(Attempt(code))
    assert status == DeliveryStatus.dead
    assert (error or "").startswith(f"refused (HTTP {code}")


def test_a_429_is_not_retried_before_its_retry_after() -> None:
    status, wait, _ = _judge(Attempt(429, retry_after_seconds=7200))
    assert (status, wait) == (DeliveryStatus.failed, timedelta(hours=2))


def test_no_connection_is_retried_and_no_answer_after_the_request_left_is_in_doubt() -> None:
    assert _judge(Attempt(error="ConnectError: refused", left=False))[0] == DeliveryStatus.failed
    status, _, error = _judge(Attempt(error="ReadTimeout: timed out", left=True))
    assert status == DeliveryStatus.in_doubt
    assert "not resent" in (error or "")
