"""The whole header set of a sent email, as a mail program or SendGrid receives it: one-click unsubscribe
(RFC 8058), the message id once under its one name, nothing personal in what travels back in events,
and the step's preheader hidden in the HTML part only."""

from __future__ import annotations

from datetime import timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path

from sqlalchemy import Engine

from nurture.playbook import Playbook
from nurture.transports import FileOutboxTransport
from nurture.transports.sendgrid_v3 import SendGridTransport
from tests.conftest import T0
from tests.db.world import SENDER, World
from tests.fakes.fake_sendgrid import FakeSendGrid

ANN = "ann@northwind.example"
NOW = T0 + timedelta(minutes=10)
SUBJECT = "See Acme Analytics on your own data"
PREHEADER = "A 30-minute demo with a product specialist."


def _demo_offer(world: World) -> int:
    """Ann asks for a demo, becomes hot and is sent the demo offer; returns its message id."""
    world.mailed_hot_lead(ANN, at=T0, now=NOW)
    [message] = [m for m in world.messages(ANN) if m.status == "sent"]
    assert message.id is not None
    assert message.template == "demo_offer"
    return message.id


def test_an_email_in_the_outbox_carries_exactly_its_headers(engine: Engine, playbook: Playbook, tmp_path: Path) -> None:
    world = World(engine, playbook, transport=FileOutboxTransport(tmp_path))
    message_id = _demo_offer(world)
    (eml,) = tmp_path.glob("*.eml")
    email = BytesParser(policy=policy.default).parse(eml.open("rb"))
    assert sorted(email.keys()) == sorted(
        [
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "List-Unsubscribe",
            "List-Unsubscribe-Post",
            "X-Nurture-Message-Id",
            "X-Nurture-Category",
            "MIME-Version",
            "Content-Type",
        ]
    )
    assert (email["From"], email["To"], email["Subject"]) == (SENDER.from_email, ANN, SUBJECT)
    unsubscribe = email["List-Unsubscribe"]
    assert unsubscribe.startswith(f"<{SENDER.public_url}/unsubscribe/2.")
    assert unsubscribe.endswith(">")
    assert "northwind" not in unsubscribe.lower()  # the link is signed for the address, it does not carry it
    assert email["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert email["X-Nurture-Message-Id"] == str(message_id)
    assert email["X-Nurture-Category"] == "demo_offer"
    html = email.get_body(("html",)).get_content()
    text = email.get_body(("plain",)).get_content()
    assert PREHEADER in html
    assert PREHEADER not in text
    assert unsubscribe.strip("<>") in html
    assert unsubscribe.strip("<>") in text


def test_an_email_sent_through_sendgrid_carries_exactly_its_headers(engine: Engine, playbook: Playbook) -> None:
    with FakeSendGrid() as fake:
        world = World(engine, playbook, transport=SendGridTransport(api_key=fake.api_key, host=fake.url))
        message_id = _demo_offer(world)
    assert fake.schema_errors == []
    (body,) = fake.accepted
    assert set(body["headers"]) == {"List-Unsubscribe", "List-Unsubscribe-Post"}
    assert body["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert body["headers"]["List-Unsubscribe"].startswith(f"<{SENDER.public_url}/unsubscribe/2.")
    assert body["custom_args"] == {"nurture_message_id": str(message_id)}  # comes back in events: no PII
    assert body["categories"] == ["demo_offer"]
    assert body["subject"] == SUBJECT
    assert body["from"]["email"] == "hello@acme.example"
    assert body["personalizations"] == [{"to": [{"email": ANN}]}]
    text, html = (part["value"] for part in body["content"])
    assert PREHEADER in html
    assert PREHEADER not in text
