"""The SendGrid transport, through the real ``sendgrid`` client, against a schema-checking fake."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sendgrid import SendGridAPIClient

from nurture.errors import AmbiguousDeliveryError, PermanentDeliveryError, TransientDeliveryError
from nurture.transports.sendgrid_v3 import SendGridTransport, request_body
from tests.fakes.fake_sendgrid import FakeSendGrid
from tests.transports.test_outbox import _email


@pytest.fixture
def fake() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as server:
        yield server


def test_a_valid_body_with_headers_category_and_no_pii(fake: FakeSendGrid) -> None:
    transport = SendGridTransport(api_key=fake.api_key, host=fake.url)
    provider_id = transport.send(_email())
    assert provider_id
    assert fake.schema_errors == []
    (body,) = fake.accepted
    assert body["personalizations"][0]["to"] == [{"email": "ann@northwind.example"}]
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert body["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert body["headers"]["List-Unsubscribe"] == "<https://nurture.acme.example/unsubscribe/abc.def>"
    assert body["categories"] == ["welcome"]
    assert body["custom_args"] == {"nurture_message_id": "7"}
    assert "ann" not in str(body["custom_args"]).lower()


def test_client_errors_are_permanent_with_sendgrid_words(fake: FakeSendGrid) -> None:
    transport = SendGridTransport(api_key=fake.api_key, host=fake.url)
    fake.fail_next(400, message="The from address does not match a verified Sender Identity")
    with pytest.raises(PermanentDeliveryError, match="400: request: The from address does not match"):
        transport.send(_email())
    with pytest.raises(PermanentDeliveryError, match="401"):
        SendGridTransport(api_key="SG.wrong", host=fake.url).send(_email())


def test_rate_limits_and_server_errors_are_transient(fake: FakeSendGrid) -> None:
    transport = SendGridTransport(api_key=fake.api_key, host=fake.url)
    fake.fail_next(429, headers={"X-RateLimit-Reset": str(int(time.time()) + 30)})
    with pytest.raises(TransientDeliveryError) as caught:
        transport.send(_email())
    assert caught.value.retry_after_seconds is not None
    assert 25 <= caught.value.retry_after_seconds <= 31
    fake.fail_next(503)
    with pytest.raises(TransientDeliveryError, match="503"):
        transport.send(_email())


def test_a_timeout_after_sending_is_ambiguous_not_retryable(fake: FakeSendGrid) -> None:
    fake.accept_slowly_next(2.0)
    with pytest.raises(AmbiguousDeliveryError, match="no answer from SendGrid after sending"):
        SendGridTransport(api_key=fake.api_key, host=fake.url, timeout_seconds=0.5).send(_email())
    assert len(fake.accepted) == 1  # SendGrid has it: a retry would be a duplicate


def test_nothing_listening_is_transient() -> None:
    with FakeSendGrid() as server:
        url = server.url
    with pytest.raises(TransientDeliveryError, match="could not reach SendGrid"):
        SendGridTransport(api_key="SG.x", host=url, timeout_seconds=2).send(_email())


def test_the_request_is_the_one_the_sendgrid_client_sends(fake: FakeSendGrid) -> None:
    SendGridTransport(api_key=fake.api_key, host=fake.url).send(_email())
    ours = fake.last_headers
    raw = SendGridAPIClient(api_key=fake.api_key, host=fake.url)
    raw.client.mail.send.post(request_body=request_body(_email()), timeout=10)
    theirs = fake.last_headers
    assert fake.accepted[0] == fake.accepted[1]
    for name in ("authorization", "user-agent", "accept", "content-type"):
        assert ours[name] == theirs[name], name
    assert ours["authorization"] == f"Bearer {fake.api_key}"


def test_connections_are_kept_alive_and_shared_by_each_thread(fake: FakeSendGrid) -> None:
    transport = SendGridTransport(api_key=fake.api_key, host=fake.url)
    fake.latency_seconds = 0.02
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(lambda _: transport.send(_email()), range(200)))
    assert len(set(ids)) == 200
    assert fake.requests == 200
    assert fake.connections <= 8
    assert transport.connections_opened == fake.connections
    assert fake.max_in_flight == 8
    transport.close()


def test_a_connection_the_server_closed_while_idle_is_opened_again(fake: FakeSendGrid) -> None:
    transport = SendGridTransport(api_key=fake.api_key, host=fake.url)
    fake.hang_up_after_next()
    transport.send(_email())
    time.sleep(0.2)  # idle: the server's close has arrived
    transport.send(_email())
    assert len(fake.accepted) == 2
    assert transport.connections_opened == 2


def test_retry_after_is_honoured(fake: FakeSendGrid) -> None:
    transport = SendGridTransport(api_key=fake.api_key, host=fake.url)
    fake.fail_next(429, headers={"Retry-After": "7", "X-RateLimit-Reset": str(int(time.time()) + 60)})
    with pytest.raises(TransientDeliveryError) as caught:
        transport.send(_email())
    assert caught.value.retry_after_seconds == 7
    # the connection is reused after an error answer
    transport.send(_email())
    assert fake.connections == 1


def test_a_dropped_connection_after_sending_is_ambiguous_and_the_next_send_reconnects(fake: FakeSendGrid) -> None:
    transport = SendGridTransport(api_key=fake.api_key, host=fake.url)
    transport.send(_email())
    fake.drop_next()
    with pytest.raises(AmbiguousDeliveryError):
        transport.send(_email())
    transport.send(_email())
    assert len(fake.accepted) == 3
    assert transport.connections_opened == 2
