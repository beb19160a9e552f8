"""The SendGrid transport, through the real ``sendgrid`` client, against a schema-checking fake."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from nurture.errors import AmbiguousDeliveryError, PermanentDeliveryError, TransientDeliveryError
from nurture.transports.sendgrid_v3 import SendGridTransport
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
