"""SendGrid v3 Mail Send: bodies built by the official ``sendgrid`` package, posted over kept-alive connections.

The ``sendgrid`` package builds each body (its ``Mail`` helper) and names the
request: the URL, and the headers its client sends (``Authorization``,
``User-Agent``, ``Accept``, ``Content-Type``). Its own client opens a new
connection per request (urllib), which at a real provider's round trip spends
more time in TCP and TLS handshakes than in sending; so the request it would
send is posted here over one ``http.client`` connection per sending thread,
kept alive and reused, opened again after an error.

Vendor errors are translated here, at the edge: 429, 5xx and errors before the
request has left become ``TransientDeliveryError`` (with the wait SendGrid asks
for, from ``Retry-After`` or ``X-RateLimit-Reset``), other 4xx
``PermanentDeliveryError`` with SendGrid's own words, and an error after the
request left (a timeout, a dropped connection) ``AmbiguousDeliveryError``.
``custom_args`` carry the message id only: SendGrid warns they are not a place
for personal data.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

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


def _error_text(body: bytes) -> str:
    try:
        errors = json.loads(body)["errors"]
        return "; ".join(f"{e.get('field') or 'request'}: {e.get('message')}" for e in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        return body.decode(errors="replace")[:500]


def retry_after_seconds(headers: http.client.HTTPMessage, *, now: float) -> float | None:
    """How long a 429 asks to wait: ``Retry-After`` (seconds or a date), else ``X-RateLimit-Reset`` (epoch)."""
    retry_after = (headers.get("Retry-After") or "").strip()
    if retry_after.isdigit():
        return float(retry_after)
    if retry_after:
        try:
            return max(parsedate_to_datetime(retry_after).timestamp() - now, 0.0)
        except (TypeError, ValueError, IndexError):
            pass
    reset = (headers.get("X-RateLimit-Reset") or "").strip()
    return max(float(reset) - now, 0.0) if reset.isdigit() else None


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """Whether the server closed an idle kept-alive connection (it reads as ready, with nothing or EOF)."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class SendGridTransport:
    """Posts each email to ``/v3/mail/send`` and returns SendGrid's ``X-Message-Id``.

    Safe to call from many threads at once: each thread keeps its own connection
    alive between requests, so ``N`` sending threads hold at most ``N`` connections.
    ``connections_opened`` counts the connections made so far.
    """

    def __init__(self, *, api_key: str, host: str, timeout_seconds: float = 10.0) -> None:
        client = SendGridAPIClient(api_key=api_key, host=host).client
        self.url = str(client.mail.send._build_url(None))
        # The headers the sendgrid client sends with a JSON body.
        self._headers = {**client.request_headers, "Content-Type": "application/json"}
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"SENDGRID_API_HOST must be an http(s) URL, not {host!r}")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self._timeout = timeout_seconds
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()
        self.connections_opened = 0

    def _connection(self) -> http.client.HTTPConnection:
        """This thread's kept-alive connection, connected; a new one if there is none or the server closed it."""
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and not _dropped(connection):
            return connection
        if connection is not None:
            self._discard(connection)
        if self._tls is not None:
            connection = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._tls)
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            connection.connect()
        except BaseException:
            connection.close()
            raise
        # Small requests written at once: without this, Nagle's algorithm holds the body back.
        if connection.sock is not None:
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._open.add(connection)
            self.connections_opened += 1
        self._local.connection = connection
        return connection

    def _discard(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        with self._lock:
            self._open.discard(connection)
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None

    def close(self) -> None:
        """Close every kept-alive connection (each thread opens a new one on its next request)."""
        with self._lock:
            connections, self._open = self._open, set()
        for connection in connections:
            connection.close()

    def send(self, email: OutgoingEmail) -> str:
        data = json.dumps(request_body(email)).encode("utf-8")
        try:
            connection = self._connection()
        except (OSError, http.client.HTTPException) as exc:
            raise TransientDeliveryError(f"could not reach SendGrid: {_reason(exc)}") from exc
        try:
            connection.request("POST", self._path, body=data, headers=self._headers)
        except (OSError, http.client.HTTPException) as exc:
            # Writing failed: SendGrid has not received a whole request (a body shorter
            # than its Content-Length is never processed), so trying again is safe.
            self._discard(connection)
            raise TransientDeliveryError(f"could not reach SendGrid: {_reason(exc)}") from exc
        try:
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            # A timeout or reset while waiting for the answer: the request left and
            # SendGrid may have accepted it. Resending could mail the lead twice.
            self._discard(connection)
            raise AmbiguousDeliveryError(f"no answer from SendGrid after sending: {exc!r}") from exc
        if response.will_close:
            self._discard(connection)
        status = response.status
        if 200 <= status < 300:
            return str(response.headers.get("X-Message-Id", ""))
        text = f"SendGrid answered {status}: {_error_text(body)}"
        if status == 429:
            wait = retry_after_seconds(response.headers, now=time.time())
            raise TransientDeliveryError(text, retry_after_seconds=wait)
        if status >= 500:
            raise TransientDeliveryError(text)
        raise PermanentDeliveryError(text)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    return str(getattr(exc, "strerror", None) or exc or type(exc).__name__)
