"""A preview for a real lead is the email the dispatcher sends it, but for an inert unsubscribe link
(SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine

from db.dispatch import load_lead_for_email
from db.engine import session_scope
from flows.previewing import Previewer
from nurture.playbook import Playbook
from nurture.preview import PREVIEW_LINK_PATH
from nurture.rendering import EmailRenderer
from nurture.transports import InMemoryTransport
from nurture.transports.base import OutgoingEmail
from tests.conftest import T0, TEMPLATES_DIR
from tests.db.world import SENDER, World

ANN = "ann@northwind.example"


def test_a_preview_for_a_lead_is_the_email_the_dispatcher_sends(engine: Engine, playbook: Playbook) -> None:
    transport = InMemoryTransport()
    world = World(engine, playbook, transport=transport)
    world.mailed_hot_lead(ANN, at=T0, now=T0 + timedelta(minutes=10))
    due = T0 + timedelta(days=2, hours=1)  # the sales hand-off, on a Wednesday morning
    world.dispatch(due)
    sent = transport.sent[-1]
    assert sent.category == "demo_offer"
    assert sent.subject.startswith("Your Acme Analytics contact")

    with session_scope(engine) as session:
        lead = load_lead_for_email(session=session, email=ANN)
        assert load_lead_for_email(session=session, email="nobody@northwind.example") is None
    assert lead is not None
    assert lead.suppressed is None
    previewer = Previewer(playbook, EmailRenderer(TEMPLATES_DIR), SENDER, TEMPLATES_DIR)
    [target] = previewer.targets("demo_offer/sales_handoff", lead=lead)
    email = previewer.render(target, lead=lead, now=due).email

    # The one difference: a preview's unsubscribe link unsubscribes no one (the lead's real link
    # would unsubscribe a customer when a marketer clicks it), everywhere the email shows it.
    inert = f"{SENDER.public_url}/unsubscribe/{PREVIEW_LINK_PATH}"
    assert email.unsubscribe_url == inert
    assert "/unsubscribe/2." in sent.unsubscribe_url
    assert inert in email.html
    assert inert in email.text
    assert "/unsubscribe/2." not in email.html + email.text

    def content(e: OutgoingEmail, link: str) -> tuple[object, ...]:
        fields = ("to_email", "from_email", "subject", "html", "text", "category", "date")
        return tuple(str(getattr(e, f)).replace(link, "LINK") for f in fields)

    assert content(email, inert) == content(sent, sent.unsubscribe_url)
    assert email.custom_args == {}  # no message behind a preview
