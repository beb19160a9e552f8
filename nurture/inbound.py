"""Events that arrive over HTTP: SendGrid's Event Webhook and the website's events API.

Parsing only: every item becomes a typed record or a problem with its index,
so one odd event never fails its batch. Real SendGrid payloads vary: a
``category`` may be a string or a list, custom args arrive as top-level keys,
``sg_event_id`` or ``sg_message_id`` may be missing, addresses may be invalid.
An event without ``sg_event_id`` gets a stable hash of its content as its id,
so a replayed batch is recognised.

Pure: ``now`` is a parameter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nurture.importing import MAX_EXTERNAL_ID, EventRecord, checked_time, event_record, external_id, normalise_email
from nurture.payloads import MAX_INT, cleaned, cleaned_text, shown, text_problem
from nurture.suppression import AddressSuppression, SuppressionReason

# SendGrid event type → what nurture does with it.
SCORED = {
    "open": "email_open",
    "click": "email_click",
    "bounce": "bounce",
    "unsubscribe": "unsubscribe",
    "group_unsubscribe": "unsubscribe",
    "spamreport": "spamreport",
}
SUPPRESSING = {
    "bounce": SuppressionReason.bounce,
    "spamreport": SuppressionReason.spamreport,
    "unsubscribe": SuppressionReason.unsubscribe,
    "group_unsubscribe": SuppressionReason.group_unsubscribe,
}
DELIVERY = {"processed", "delivered", "deferred", "dropped", "bounce"}
KNOWN = set(SCORED) | set(SUPPRESSING) | DELIVERY | {"group_resubscribe"}
# The custom arg of a test send (`nurture preview --send-test`): its events belong to no lead and are ignored.
TEST_SEND_ARG = "nurture_test"
# Event fields kept as the stored event's properties.
PROPERTY_KEYS = ("url", "useragent", "ip", "category", "status", "type", "sg_machine_open")
# An open by a machine (Apple Mail Privacy Protection prefetching the images) is stored under
# its own kind: no scoring rule names it, so it is worth nothing, and it is not an open.
MACHINE_OPEN = "email_machine_open"
# Dropped for one of these reasons means the address itself is the problem.
INVALID_ADDRESS_DROPS = ("invalid", "bounced address", "unsubscribed address", "spam reporting address")


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """One SendGrid event, normalised."""

    event_type: str
    email: str | None
    occurred_at: datetime
    external_id: str
    message_id: int | None
    provider_message_id: str | None
    reason: str | None
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def scoring_kind(self) -> str | None:
        if self.event_type == "open" and self.properties.get("sg_machine_open") is True:
            return MACHINE_OPEN
        return SCORED.get(self.event_type)

    @property
    def suppression_reason(self) -> SuppressionReason | None:
        if self.event_type == "dropped":
            text = (self.reason or "").lower()
            return SuppressionReason.dropped if any(marker in text for marker in INVALID_ADDRESS_DROPS) else None
        return SUPPRESSING.get(self.event_type)


def provider_suppressions(events: Iterable[ProviderEvent]) -> list[AddressSuppression]:
    """The addresses a webhook batch suppresses: one per address, the first reason wins."""
    planned: dict[str, AddressSuppression] = {}
    for event in events:
        reason = event.suppression_reason
        if event.email and reason is not None and event.email not in planned:
            planned[event.email] = AddressSuppression(event.email, reason)
    return list(planned.values())


@dataclass
class ParsedBatch:
    events: list[ProviderEvent] = field(default_factory=list)
    ignored: int = 0
    problems: list[str] = field(default_factory=list)


def _stable_id(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:40]


def _event_id(item: dict[str, Any]) -> str:
    """``sg_event_id`` when it is usable text; a hash of it (or of the event, without one) otherwise.

    A hash, not a cut: two long ids that share their first 200 characters stay two events.
    """
    value = item.get("sg_event_id")
    if not value:
        return _stable_id(item)
    if isinstance(value, str | int) and not isinstance(value, bool):
        text = str(value)
        if len(text) <= MAX_EXTERNAL_ID and text_problem(text) is None:
            return text
    return _stable_id({"sg_event_id": value})


def _message_id(item: dict[str, Any]) -> int | None:
    value = item.get("nurture_message_id")
    if value is None and isinstance(item.get("unique_args"), dict):
        value = item["unique_args"].get("nurture_message_id")
    if not isinstance(value, str | int) or isinstance(value, bool) or len(str(value)) > 19:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 0 < number <= MAX_INT else None  # message ids are positive BIGINTs


def _test_send(item: dict[str, Any]) -> bool:
    """An event of a test send (`nurture preview --send-test`): no lead's message, never counted."""
    args = item.get("unique_args")
    return bool(item.get(TEST_SEND_ARG) or (isinstance(args, dict) and args.get(TEST_SEND_ARG)))


def _provider_message_id(value: Any) -> str | None:
    if not value or not isinstance(value, str):
        return None
    text = cleaned_text(value.split(".")[0])
    return text if 0 < len(text) <= MAX_EXTERNAL_ID else None


def _reason(item: dict[str, Any]) -> str | None:
    value = item.get("reason") or item.get("response")
    if not value:
        return None
    return cleaned_text(str(cleaned(value)))[:500] or None


def _occurred_at(value: Any) -> datetime:
    """SendGrid's ``timestamp`` (Unix seconds); ValueError when missing or out of range."""
    if isinstance(value, bool) or not isinstance(value, int | float | str) or len(str(value)) > 20:
        raise ValueError("no valid timestamp")
    try:
        moment = datetime.fromtimestamp(int(value), tz=UTC)
    except (ValueError, OverflowError, OSError) as exc:
        raise ValueError(f"timestamp {shown(value)} is not a Unix time") from exc
    try:
        return checked_time(moment, str(value))
    except ValueError as exc:
        raise ValueError(f"timestamp {shown(value)} is out of range: times from 1970 to 2099 are accepted") from exc


def parse_sendgrid_batch(payload: Any) -> ParsedBatch:
    """Normalise a webhook body (a JSON list of events); unknown types are counted, not failed.

    What SendGrid cannot send again is kept: text nurture cannot store (a NUL, an unpaired
    surrogate, a number beyond 64 bits) is cleaned out of the event rather than failing it.
    """
    batch = ParsedBatch()
    if not isinstance(payload, list):
        batch.problems.append("the body must be a JSON list of events")
        return batch
    for index, item in enumerate(payload):
        if not isinstance(item, dict):
            batch.problems.append(f"event {index}: not an object")
            continue
        event_type = str(item.get("event") or "")
        if event_type not in KNOWN or _test_send(item):
            batch.ignored += 1
            continue
        try:
            occurred_at = _occurred_at(item.get("timestamp"))
        except ValueError as exc:
            batch.problems.append(f"event {index}: {exc}")
            continue
        try:
            email: str | None = normalise_email(item.get("email"))
        except ValueError:
            email = None
        properties = {key: cleaned(item[key]) for key in PROPERTY_KEYS if key in item}
        message_id = _message_id(item)
        if message_id is not None:
            # Which email was opened or clicked: sequences react to a step's opens and clicks.
            properties["nurture_message_id"] = message_id
        batch.events.append(
            ProviderEvent(
                event_type=event_type,
                email=email,
                occurred_at=occurred_at,
                external_id=_event_id(item),
                message_id=message_id,
                provider_message_id=_provider_message_id(item.get("sg_message_id")),
                reason=_reason(item),
                properties=properties,
            )
        )
    return batch


def parse_api_events(payload: Any, *, now: datetime) -> tuple[list[EventRecord], list[dict[str, Any]]]:
    """The events API body — one event or ``{"events": [...]}`` — as records and per-item errors."""
    if isinstance(payload, dict) and "events" in payload:
        items = payload["events"]
        if not isinstance(items, list):
            return [], [{"index": None, "error": "events must be a list of event objects"}]
    elif isinstance(payload, dict):
        items = [payload]
    else:
        return [], [{"index": None, "error": 'the body must be one event object or {"events": [...]}'}]
    records: list[EventRecord] = []
    errors: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            errors.append({"index": index, "error": "each event must be a JSON object"})
            continue
        try:
            identifier = external_id(item.get("id"), "id")
            row = {**item, "occurred_at": item.get("occurred_at") or now.isoformat(), "external_id": identifier}
            records.append(event_record(index, row))
        except ValueError as exc:
            errors.append({"index": index, "error": str(exc)})
    return records, errors
