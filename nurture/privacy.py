"""Hashed addresses: how nurture remembers not to mail someone it has forgotten.

A suppression keeps the SHA-256 of the normalised address, so after
``nurture forget`` no readable address is left, yet an import or an event that
brings the address back still finds it suppressed.
"""

from __future__ import annotations

import hashlib


def email_hash(normalised_email: str) -> str:
    """The SHA-256 of an address exactly as given: ``normalise_email``'s output, or a lead's stored address.

    Not normalised again here: a lead stored before addresses had one spelling keeps
    the hash its suppressions were written under, so they still stop its mail.
    """
    return hashlib.sha256(normalised_email.encode("utf-8")).hexdigest()
