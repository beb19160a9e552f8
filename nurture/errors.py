"""The one error tree of nurture.

Every error a user can cause or meet is a ``NurtureError``; the CLI and the API
turn it into a message (what was wrong, where, what was kept), never a traceback.

    NurtureError
     ├── ConfigurationError        settings that cannot work together
     ├── PlaybookError             nurture.yaml is invalid (key path, line)
     ├── TemplateError             a template is missing or fails to render
     ├── ImportDataError           a whole import file is unusable
     ├── PayloadError              a request body, import line or item that cannot be read or
     │                             stored (also a ValueError: every row parser catches it)
     ├── DatabaseBusyError         deadlocks or lock waits outlasted the retries: try again later
     ├── SchemaOutOfDateError      the database needs `nurture db upgrade`
     ├── UnknownNameError          a name on the command line (a template, a step) that does not exist
     └── DeliveryError             a message could not be handed to the provider
          ├── TransientDeliveryError   try again later (429, 5xx, refused connection)
          ├── PermanentDeliveryError   do not retry (4xx, invalid address)
          └── AmbiguousDeliveryError   the request left but no answer came: it may
                                       have been sent, so it must not be resent blindly
"""

from __future__ import annotations


class NurtureError(Exception):
    """Base of every error nurture reports to a user."""


class ConfigurationError(NurtureError):
    """Settings are missing or contradict each other."""


class PlaybookError(NurtureError):
    """The playbook (nurture.yaml) or its templates are invalid.

    ``problems`` holds one line per problem, each naming the key path and,
    where known, the file and line.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid playbook:\n" + "\n".join(f"  - {p}" for p in problems))


class TemplateError(NurtureError):
    """A template is missing, does not parse, or fails to render for a lead."""


class ImportDataError(NurtureError):
    """An import file cannot be read at all (missing, unknown format, no header)."""


class PayloadError(NurtureError, ValueError):
    """Untrusted input that cannot be read or stored: too deeply nested, not JSON, not text, out of range.

    The message says what is wrong and where (a key path, an item index), never echoing
    more than a short excerpt of the input.
    """


class DatabaseBusyError(NurtureError):
    """The database kept refusing a transaction (deadlock, serialization failure, lock wait).

    Raised once the bounded retries are spent; the transaction was rolled back, so
    nothing of it was stored and the caller may send it again after ``retry_after_seconds``.
    """

    def __init__(self, message: str, *, retry_after_seconds: int = 1) -> None:
        self.retry_after_seconds = retry_after_seconds
        super().__init__(message)


class SchemaOutOfDateError(NurtureError):
    """The database schema is older (or newer) than this version of nurture."""


class UnknownNameError(NurtureError):
    """A name given on the command line (a template, a sequence's step) that the playbook does not have.

    The message offers the closest names ("did you mean") and lists the valid ones.
    """


class DeliveryError(NurtureError):
    """A message could not be handed to the email provider."""


class TransientDeliveryError(DeliveryError):
    """The provider may accept the message later (rate limit, server error, network)."""

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        self.retry_after_seconds = retry_after_seconds
        super().__init__(message)


class PermanentDeliveryError(DeliveryError):
    """The provider rejected the message; sending it again would fail the same way."""


class AmbiguousDeliveryError(DeliveryError):
    """The request may have reached the provider (a timeout after sending).

    Retrying could send the email twice, so the message is left for the
    provider's own events (or a reconciliation) to settle.
    """
