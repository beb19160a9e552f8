"""In-memory transport: keeps sent emails in a list (tests, dry runs)."""

from __future__ import annotations

from nurture.transports.base import OutgoingEmail


class InMemoryTransport:
    def __init__(self) -> None:
        self.sent: list[OutgoingEmail] = []

    def send(self, email: OutgoingEmail) -> str:
        self.sent.append(email)
        return f"memory-{email.message_id}"
