"""The transport seam: what an email is when it leaves nurture, and how it is handed over."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    """A rendered email, ready for a provider.

    ``custom_args`` travel with the email to the provider and come back in its
    events: they carry the message id only, never personal data.
    """

    message_id: int
    idempotency_key: str
    to_email: str
    from_email: str
    subject: str
    html: str
    text: str
    unsubscribe_url: str
    category: str
    date: datetime | None = None
    unsubscribe_mailto: str | None = None
    asm_group_id: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    custom_args: dict[str, str] = field(default_factory=dict)
    # The inbox's preview text; the HTML part already carries it, so no transport sends it again.
    preheader: str = ""


class EmailTransport(Protocol):
    """Hands an email to a provider and returns the provider's message id.

    Raises ``TransientDeliveryError`` when trying again later may work and
    ``PermanentDeliveryError`` when it will not.
    """

    def send(self, email: OutgoingEmail) -> str: ...


def one_line(value: str) -> str:
    """A header value on one line: every run of whitespace, line breaks included, becomes one space.

    CR and LF are what start a new header; ``str.split`` also breaks on the separators
    some mail software treats as line ends (U+0085, U+2028, U+2029, U+001C–U+001F), so
    no value nurture writes into a header can add one.
    """
    return " ".join(value.split())


def header_text(value: str) -> str:
    """Free text for a header (a subject, a category): on one line, and never read as an encoded word.

    Python's email package decodes RFC 2047 encoded words in a value as it is set, so a
    lead named ``=?utf-8?q?x=0D=0ABcc:_a@b.example?=`` would put a CR LF and a ``Bcc``
    header into the written file. A WORD JOINER (U+2060, invisible) after the ``=`` keeps
    the text as typed: it is shown as written, and decoded by no one.
    """
    return one_line(value).replace("=?", "=\u2060?")


def list_unsubscribe_headers(email: OutgoingEmail) -> dict[str, str]:
    """RFC 8058 one-click unsubscribe headers, on every email (the mailto only if configured)."""
    targets = [f"<{email.unsubscribe_url}>"]
    if email.unsubscribe_mailto:
        targets.append(f"<mailto:{email.unsubscribe_mailto}?subject=unsubscribe>")
    return {
        "List-Unsubscribe": ", ".join(targets),
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
