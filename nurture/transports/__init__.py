"""Email transports: the only place nurture talks to the outside world about email.

Sending is one protocol with one method (``EmailTransport.send``); SendGrid,
the file outbox and the in-memory transport implement it, so tests and dry runs
take the same path as production with a different transport injected.
"""

from __future__ import annotations

from nurture.settings import Settings
from nurture.transports.base import EmailTransport, OutgoingEmail
from nurture.transports.memory import InMemoryTransport
from nurture.transports.outbox import FileOutboxTransport

__all__ = ["EmailTransport", "FileOutboxTransport", "InMemoryTransport", "OutgoingEmail", "transport_from_settings"]


def transport_from_settings(settings: Settings) -> EmailTransport:
    """The transport ``NURTURE_TRANSPORT`` names: outbox (default), sendgrid or memory."""
    if settings.nurture_transport == "sendgrid":
        from nurture.transports.sendgrid_v3 import SendGridTransport

        assert settings.sendgrid_api_key is not None  # the settings validator demands it
        return SendGridTransport(api_key=settings.sendgrid_api_key.get_secret_value(), host=settings.sendgrid_api_host)
    if settings.nurture_transport == "memory":
        return InMemoryTransport()
    return FileOutboxTransport(settings.nurture_outbox_dir)
