"""Signed unsubscribe links: unguessable, dated, bound to the address, and verifiable after a key change.

A link's token (version 2) is ``2.<lead id>.<day issued>.<MAC>``: the day is counted
in days since 1970-01-01 (UTC), and the MAC is an HMAC-SHA256, cut to 144 bits,
over the version, the lead id, the day and the lead's canonical address. The
address is not in the token: whoever checks one loads the lead and recomputes, so a
token made for an erased person, or for another person who got the same id, never
matches. A token looks like ``2.18342.20514.Xq0…`` (about 40 characters).

Signing uses ``NURTURE_SECRET_KEY`` only; checking accepts it and any key in
``NURTURE_SECRET_KEY_PREVIOUS``, so the key can be rotated without breaking the links
already in people's mailboxes. Version 1 tokens (``<base64 lead id>.<MAC>``, from
before links were dated) are still accepted, with any of those keys.

A link is valid for ``NURTURE_UNSUBSCRIBE_LINK_DAYS``; an older one that is authentic
is reported as expired, and the API still honours it (docs/api.md, "Unsubscribe").

Pure: no clock (``now`` is a parameter), no database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from nurture.importing import canonical_address
from nurture.payloads import MAX_INT

# Real tokens are at most 53 characters; anything much longer is not one.
MAX_TOKEN_LENGTH = 200
VERSION = 2
_MAC_BYTES = 18  # 144 bits: 24 characters of base64, with no padding and no spare bits
# One spelling per token: no leading zeros, no sign, ASCII digits only, the MAC at full length.
_V2 = re.compile(r"^2\.([1-9][0-9]{0,18})\.(0|[1-9][0-9]{0,5})\.([A-Za-z0-9_-]{24})$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class UnsubscribeLink:
    """What an authentic token says: whose link it is, the day it was issued (None for version 1),
    and whether it is older than the links are meant to last."""

    lead_id: int
    version: int
    issued_day: int | None
    expired: bool


def day_number(moment: datetime) -> int:
    """Days since 1970-01-01 in UTC: the date a link carries."""
    return (moment.astimezone(UTC) - _EPOCH).days


def _encoded(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest[:_MAC_BYTES]).decode().rstrip("=")


def _mac_v2(lead_id: int, day: int, email: str, secret: str) -> str:
    message = f"nurture-unsubscribe\n{VERSION}\n{lead_id}\n{day}\n{canonical_address(email)}".encode()
    return _encoded(hmac.new(secret.encode(), message, hashlib.sha256).digest())


def _mac_v1(payload: bytes, secret: str) -> str:
    return _encoded(hmac.new(secret.encode(), b"unsubscribe:" + payload, hashlib.sha256).digest())


def make_unsubscribe_token(lead_id: int, *, email: str, now: datetime, secret: str) -> str:
    """A version 2 token for the lead with this address, issued ``now``."""
    if not 0 < lead_id <= MAX_INT:
        raise ValueError(f"{lead_id} is not a lead id")
    day = day_number(now)
    return f"{VERSION}.{lead_id}.{day}.{_mac_v2(lead_id, day, email, secret)}"


def unsubscribe_url(public_url: str, lead_id: int, *, email: str, now: datetime, secret: str) -> str:
    """The link in an email sent ``now`` to ``email``."""
    token = make_unsubscribe_token(lead_id, email=email, now=now, secret=secret)
    return f"{public_url.rstrip('/')}/unsubscribe/{token}"


def claimed_lead_id(token: str) -> int | None:
    """The lead id a well-formed token names, before any check: the lead to load and verify it against.

    None when the token cannot be a token at all. A returned id proves nothing.
    """
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        return None
    match = _V2.match(token)
    lead_id: int | None
    if match is not None:
        lead_id = int(match[1])
    else:
        payload, separator, mac = token.partition(".")
        if not separator or not payload or not mac or "." in mac:
            return None
        lead_id = _v1_lead_id(payload)
    # Lead ids are positive BIGINTs: a larger number names no lead (and must not reach the database).
    return lead_id if lead_id is not None and 0 < lead_id <= MAX_INT else None


def _v1_lead_id(payload: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode("ascii")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    # Version 1 signed whatever the payload held; only a plain positive number names a lead.
    if not text.isdigit() or text.startswith("0") or len(text) > 19:
        return None
    return int(text)


def _any_key_matches(mac: str, expected: Sequence[str]) -> bool:
    # Every key is tried, so how long this takes does not say which key (or whether one) matched.
    matched = False
    for candidate in expected:
        matched |= hmac.compare_digest(mac.encode(), candidate.encode())
    return matched


def read_unsubscribe_token(
    token: str, *, email: str, keys: Sequence[str], now: datetime, link_days: int
) -> UnsubscribeLink | None:
    """What an authentic token says, checked against the address of the lead it names.

    ``email`` is that lead's stored address; ``keys`` are the keys accepted (the
    current one first). None when the token is forged, malformed, signed with a key
    not in ``keys``, or made for another address.
    """
    lead_id = claimed_lead_id(token)
    if lead_id is None or not keys:
        return None
    match = _V2.match(token)
    if match is not None:
        day, mac = int(match[2]), match[3]
        if not _any_key_matches(mac, [_mac_v2(lead_id, day, email, key) for key in keys]):
            return None
        return UnsubscribeLink(lead_id, VERSION, day, expired=day_number(now) - day > link_days)
    payload, _, mac = token.partition(".")
    if not _any_key_matches(mac, [_mac_v1(payload.encode(), key) for key in keys]):
        return None
    return UnsubscribeLink(lead_id, 1, None, expired=False)
