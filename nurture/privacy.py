"""Hashed addresses: how nurture remembers not to mail someone it has forgotten.

A suppression keeps the SHA-256 of the normalised address, so after
``nurture forget`` no readable address is left, yet an import or an event that
brings the address back still finds it suppressed.
"""

from __future__ import annotations

import hashlib


def email_hash(normalised_email: str) -> str:
    return hashlib.sha256(normalised_email.encode("utf-8")).hexdigest()
