"""SendGrid v3 Mail Send, through the official ``sendgrid`` package.

Vendor errors are translated here, at the edge: 429, 5xx and network errors
become ``TransientDeliveryError`` (with the rate-limit reset when SendGrid
sends one), other 4xx ``PermanentDeliveryError`` with SendGrid's own words.
``custom_args`` carry the message id and idempotency key only: SendGrid warns
they are not a place for personal data.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.error import URLError

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Asm, Category, CustomArg, GroupId, Header, Mail

from nurture.errors import AmbiguousDeliveryError, PermanentDeliveryError, TransientDeliveryError
from nurture.transports.base import OutgoingEmail, header_text, list_unsubscribe_headers, one_line


def build_mail(email: OutgoingEmail) -> Mail:
    """The SendGrid ``Mail`` for an email: both parts, headers, category, custom args.

    Subject, category and header values are put on one line (``one_line``), so nothing
    in them can become a header of its own.
    """
    mail = Mail(
        from_email=email.from_email,
        to_emails=email.to_email,
        subject=header_text(email.subject),
        plain_text_content=email.text,
        html_content=email.html,
    )
    for name, value in {**list_unsubscribe_headers(email), **email.headers}.items():
        mail.header = Header(name, one_line(value))
    for name, value in email.custom_args.items():
        mail.custom_arg = CustomArg(name, value)
    mail.category = Category(one_line(email.category)[:255])
    if email.asm_group_id is not None:
        mail.asm = Asm(GroupId(email.asm_group_id))
    return mail


def request_body(email: OutgoingEmail) -> dict[str, Any]:
    """The Mail Send body for an email, addressed to exactly ``to_email``.

    The ``sendgrid`` helpers read a recipient as ``Name <address>`` with the standard
    library's ``parseaddr``, which takes ``a(b)@x.example`` for ``a@x.example`` and
    ``a:b@x.example`` for ``b@x.example``; the address nurture validated is put back
    as it is. Raises ``PermanentDeliveryError`` when the helpers cannot build a body.
    """
    try:
        body: dict[str, Any] = build_mail(email).get()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PermanentDeliveryError(f"cannot build the SendGrid request: {type(exc).__name__}: {exc}") from exc
    for personalization in body["personalizations"]:
        personalization["to"] = [{"email": email.to_email}]
    return body


def _error_text(body: Any) -> str:
    try:
        errors = json.loads(body)["errors"]
        return "; ".join(f"{e.get('field') or 'request'}: {e.get('message')}" for e in errors)
    except (ValueError, KeyError, TypeError):
        return (body.decode(errors="replace") if isinstance(body, bytes) else str(body))[:500]


class SendGridTransport:
    """Posts each email to ``/v3/mail/send`` and returns SendGrid's ``X-Message-Id``."""

    def __init__(self, *, api_key: str, host: str, timeout_seconds: float = 10.0) -> None:
        self._client = SendGridAPIClient(api_key=api_key, host=host)
        self._timeout = timeout_seconds

    def send(self, email: OutgoingEmail) -> str:
        body = request_body(email)
        try:
            response = self._client.client.mail.send.post(request_body=body, timeout=self._timeout)
        except HTTPError as exc:
            status = int(getattr(exc, "status_code", 0) or 0)
            text = f"SendGrid answered {status}: {_error_text(getattr(exc, 'body', b''))}"
            if status == 429:
                reset = (getattr(exc, "headers", None) or {}).get("X-RateLimit-Reset")
                wait = max(float(reset) - time.time(), 0.0) if reset and str(reset).isdigit() else None
                raise TransientDeliveryError(text, retry_after_seconds=wait) from exc
            if status >= 500:
                raise TransientDeliveryError(text) from exc
            raise PermanentDeliveryError(text) from exc
        except URLError as exc:
            # urllib raises URLError while connecting and sending: SendGrid has not
            # received the request, so trying again later is safe.
            raise TransientDeliveryError(f"could not reach SendGrid: {exc.reason}") from exc
        except OSError as exc:
            # A timeout or reset while waiting for the answer: the request left and
            # SendGrid may have accepted it. Resending could mail the lead twice.
            raise AmbiguousDeliveryError(f"no answer from SendGrid after sending: {exc!r}") from exc
        headers = response.headers
        return str(headers.get("X-Message-Id", "")) if headers is not None else ""
