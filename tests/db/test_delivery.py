"""Delivery as a promise, on both engines: exactly once under faults, paced, suppressed, settled."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, insert

from db.engine import session_scope
from db.models import Message
from flows.sending import dispatch_due
from nurture.delivery import RetryPolicy
from nurture.playbook import Playbook
from nurture.rendering import EmailRenderer
from nurture.transports import InMemoryTransport
from nurture.transports.sendgrid_v3 import SendGridTransport
from tests.conftest import T0, TEMPLATES_DIR
from tests.db.world import FAST_RETRIES, SENDER, World
from tests.fakes.fake_sendgrid import FakeSendGrid

NOW = T0 + timedelta(minutes=10)


def _hot_leads(world: World, count: int, **profile: object) -> list[str]:
    emails = [f"lead{i}@northwind.example" for i in range(count)]
    for email in emails:
        world.lead(email, at=T0, first_name="Ann", job_title="CTO", company_size=500, **profile)
    for email in emails:
        world.events(email, ("demo_request", T0), ("webinar_attended", T0), ("pricing_view", T0))
    world.advance(NOW)
    return emails


def _sendgrid_world(engine: Engine, playbook: Playbook, fake: FakeSendGrid, timeout: float = 5) -> World:
    return World(
        engine, playbook, transport=SendGridTransport(api_key=fake.api_key, host=fake.url, timeout_seconds=timeout)
    )


def test_every_message_is_accepted_exactly_once_despite_30_percent_failures(engine: Engine, playbook: Playbook) -> None:
    with FakeSendGrid() as fake:
        world = _sendgrid_world(engine, playbook, fake)
        _hot_leads(world, 60)
        fake.fail_randomly(0.3, seed=4)
        policy = RetryPolicy(base_seconds=0.005, cap_seconds=0.05, attempts_per_dispatch=12)
        result = world.dispatch(NOW, concurrency=4, policy=policy)
        assert result.by_status == {"sent": 60}
        assert len(fake.rejected) > 10  # the faults really happened
        assert fake.schema_errors == []
        assert sorted(Counter(fake.message_ids()).values()) == [1] * 60
        for body in fake.accepted:
            assert set(body["custom_args"]) == {"nurture_message_id"}
            assert "@" not in str(body["custom_args"])


def test_a_permanent_rejection_is_recorded_with_sendgrids_reason_and_not_retried(
    engine: Engine, playbook: Playbook
) -> None:
    with FakeSendGrid() as fake:
        world = _sendgrid_world(engine, playbook, fake)
        (email,) = _hot_leads(world, 1)
        fake.fail_next(400, message="Does not contain a valid address.")
        result = world.dispatch(NOW)
        assert result.by_status == {"failed": 1}
        message = world.messages(email)[0]
        assert message.status == "failed"
        assert message.last_error == "SendGrid answered 400: request: Does not contain a valid address."
        assert message.attempts == 1
        assert world.cycle(NOW + timedelta(days=2)).by_status == {"sent": 1}  # only the next step
        assert len(fake.accepted) == 1


def test_a_dropped_connection_after_sending_is_never_resent(engine: Engine, playbook: Playbook) -> None:
    with FakeSendGrid() as fake:
        world = _sendgrid_world(engine, playbook, fake)
        (email,) = _hot_leads(world, 1)
        fake.drop_next()
        assert world.dispatch(NOW).by_status == {"in_doubt": 1}
        assert world.dispatch(NOW + timedelta(hours=1)).claimed == 0
        assert len(fake.accepted) == 1
        message = world.messages(email)[0]
        assert message.status == "in_doubt"  # named for what it is, never called failed
        assert message.send_started_at is not None
        assert fake.message_ids().count(str(message.id)) == 1


def test_quiet_hours_hold_an_email_until_the_leads_morning(engine: Engine, playbook: Playbook) -> None:
    transport = InMemoryTransport()
    # Quiet hours alone: the shipped send window (08:00–20:00) would hold this email as well.
    policy = playbook.contact_policy.model_copy(update={"send_window": None})
    world = World(engine, playbook.model_copy(update={"contact_policy": policy}), transport=transport)
    tokyo_night = T0.replace(hour=22)  # 07:00 in Tokyo
    world.lead("kenji@tokyo.example", at=T0, job_title="CTO", company_size=500, timezone="Asia/Tokyo")
    world.events(
        "kenji@tokyo.example",
        ("demo_request", tokyo_night),
        ("webinar_attended", tokyo_night),
        ("pricing_view", tokyo_night),
    )
    world.advance(tokyo_night)
    result = world.dispatch(tokyo_night)
    assert result.claimed == 0
    assert result.deferred == {"the end of quiet hours (Asia/Tokyo)": 1}
    assert transport.sent == []
    message = world.messages("kenji@tokyo.example")[0]
    assert (message.status, message.due_at) == ("queued", T0.replace(hour=23))
    assert world.dispatch(T0.replace(hour=23)).by_status == {"sent": 1}


def test_the_frequency_cap_defers_the_fourth_email_in_a_week(engine: Engine, playbook: Playbook) -> None:
    world = World(engine, playbook)
    (email,) = _hot_leads(world, 1)
    lead_id = world.row(email).id
    with session_scope(engine) as session:
        enrollment_id = world.messages(email)[0].enrollment_id
        session.execute(
            insert(Message),
            [
                {
                    "lead_id": lead_id,
                    "enrollment_id": enrollment_id,
                    "sequence": "welcome",
                    "step": i,
                    "template": "welcome",
                    "subject_template": "x",
                    "idempotency_key": f"earlier-{i}",
                    "status": "sent",
                    "due_at": NOW - timedelta(days=i + 1),
                    "sent_at": NOW - timedelta(days=i + 1),
                    "attempts": 1,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for i in range(3)
            ],
        )
    result = world.dispatch(NOW)
    assert result.claimed == 0
    message = next(m for m in world.messages(email) if m.template == "demo_offer")
    assert message.status == "queued"
    assert message.due_at == NOW - timedelta(days=3) + timedelta(days=7)
    assert message.last_error == "waiting for the frequency cap (3 per 7 days, 0:00:00)"


def test_two_dispatchers_never_send_the_same_message(engine: Engine, playbook: Playbook) -> None:
    with FakeSendGrid() as fake:
        world = _sendgrid_world(engine, playbook, fake)
        _hot_leads(world, 80)
        results = []

        def run() -> None:
            results.append(
                dispatch_due(
                    engine=engine,
                    playbook=playbook,
                    renderer=EmailRenderer(TEMPLATES_DIR),
                    transport=world.transport,
                    sender=SENDER,
                    now=NOW,
                    batch_size=10,
                    concurrency=2,
                    policy=FAST_RETRIES,
                    clock=lambda: datetime.now(UTC),
                )
            )

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(r.by_status["sent"] for r in results) == 80
        assert all(r.by_status["sent"] > 0 for r in results), "both dispatchers did some of the work"
        assert sorted(Counter(fake.message_ids()).values()) == [1] * 80


@pytest.mark.parametrize("mailto", [None, "unsubscribe@acme.example"])
def test_list_unsubscribe_and_asm_group(mailto: str | None) -> None:
    from nurture.transports.sendgrid_v3 import build_mail
    from tests.transports.test_outbox import _email

    body = build_mail(_email(unsubscribe_mailto=mailto, asm_group_id=4242)).get()
    expected = "<https://nurture.acme.example/unsubscribe/abc.def>"
    if mailto:
        expected += ", <mailto:unsubscribe@acme.example?subject=unsubscribe>"
    assert body["headers"]["List-Unsubscribe"] == expected
    assert body["asm"] == {"group_id": 4242}
