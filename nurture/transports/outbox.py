"""File outbox: one ``.eml`` file per message, openable in any mail client.

The embedded default. The file name is derived from the message's idempotency
key, and files are written atomically (temp file, then rename), so sending the
same message twice leaves one file, never two or a torn one.
"""

from __future__ import annotations

import os
import re
import tempfile
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from nurture.errors import PermanentDeliveryError, TransientDeliveryError
from nurture.transports.base import OutgoingEmail, header_text, list_unsubscribe_headers, one_line

# Headers are written as UTF-8 (RFC 6532), on lines of up to 998 characters (RFC 5322's limit).
# The default policy encodes non-ASCII text as RFC 2047 words and folds at 78 characters, and
# reading such a header back loses or adds spaces around the folds and words: the subject in
# the file was not the one rendered. An address with non-ASCII letters needs UTF-8 anyway: as
# an RFC 2047 word it names no mailbox at all.
_UTF8_HEADERS = policy.default.clone(utf8=True, max_line_length=998)


def outbox_filename(email: OutgoingEmail) -> str:
    safe_key = re.sub(r"[^A-Za-z0-9_.-]+", "_", email.idempotency_key)
    return f"{email.message_id:08d}_{safe_key}.eml"


def build_mime(email: OutgoingEmail) -> EmailMessage:
    """A multipart/alternative message with the text and HTML parts and all headers.

    Every header value is put on one line (``one_line``), so nothing in a subject, a
    category or a link can start a header of its own. Raises ``PermanentDeliveryError``
    when the email cannot be written at all: writing it again would fail the same way.
    """
    mime = EmailMessage(policy=_UTF8_HEADERS)
    try:
        mime["From"] = one_line(email.from_email)
        mime["To"] = one_line(email.to_email)
        mime["Subject"] = header_text(email.subject)
        if email.date is not None:
            mime["Date"] = format_datetime(email.date)
        mime["Message-ID"] = make_msgid(idstring=f"nurture-{email.message_id}", domain="nurture.local")
        for name, value in {**list_unsubscribe_headers(email), **email.headers}.items():
            mime[name] = one_line(value)
        for name, value in email.custom_args.items():
            # nurture_message_id → X-Nurture-Message-Id: the prefix once, not twice.
            header = f"X-Nurture-{name.removeprefix('nurture_').replace('_', '-').title()}"
            if header not in mime:  # given as a header too (X-Nurture-Test of a test send): once
                mime[header] = one_line(value)
        mime["X-Nurture-Category"] = header_text(email.category)
        mime.set_content(email.text)
        mime.add_alternative(email.html, subtype="html")
    except (ValueError, IndexError, TypeError) as exc:  # the email package's errors for what it cannot write
        raise PermanentDeliveryError(f"cannot write the email: {type(exc).__name__}: {exc}") from exc
    return mime


class FileOutboxTransport:
    """Writes each email to ``<outbox>/<message id>_<idempotency key>.eml``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def send(self, email: OutgoingEmail) -> str:
        mime = build_mime(email)
        try:
            content = bytes(mime)
        except (ValueError, IndexError, TypeError, UnicodeError) as exc:
            raise PermanentDeliveryError(f"cannot write the email: {type(exc).__name__}: {exc}") from exc
        target = self.directory / outbox_filename(email)
        temp: str | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=".sending-", suffix=".eml")
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(temp, target)
        except OSError as exc:
            if temp is not None and os.path.exists(temp):  # a full disk leaves no torn file behind
                os.unlink(temp)
            raise TransientDeliveryError(f"cannot write to the outbox {self.directory}: {exc.strerror}") from exc
        return f"outbox:{target.name}"
