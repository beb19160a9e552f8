"""One spelling per address: stored leads and suppressions move to the canonical spelling.

Before 0005 an address was only trimmed and lower-cased, so a lead imported in NFD
(``jose\u0301@``) or with a punycode domain (``xn--bcher-kva``) was stored that way,
and every event, unsubscribe and ``nurture forget`` now arrives in the canonical
spelling (NFC, Unicode domain, no trailing dot): it would miss that row. Each such
lead and each readable suppression is rewritten to the canonical spelling (a
suppression's hash with it), unless another row already has that spelling: two rows
for one person are left for a person to merge (docs/operations.md counts them).

The spelling rule is copied here, not imported, so this migration does the same
thing whatever later versions of nurture change.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import hashlib
import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

CHUNK = 10_000


def _label(label: str) -> str:
    if not label.startswith("xn--") or len(label) > 63 or not label.isascii():
        return label
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except ValueError:
        return label
    if decoded.isascii() or decoded != unicodedata.normalize("NFC", decoded.lower()):
        return label
    if any(unicodedata.category(ch)[0] in "CZ" or ch in "@.<>\"',;:()[]\\" for ch in decoded):
        return label
    return decoded if decoded.encode("punycode").decode("ascii") == label[4:] else label


def canonical(email: str) -> str:
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", email.strip()).lower())
    local, at, domain = text.rpartition("@")
    if not at:
        return text
    return f"{local}@{'.'.join(_label(label) for label in domain.removesuffix('.').split('.'))}"


def _respelled(connection: sa.Connection, table: str) -> list[tuple[int, str, str]]:
    """(id, stored, canonical) for every row of ``table`` whose address is not in the canonical spelling."""
    found: list[tuple[int, str, str]] = []
    last = 0
    while True:
        rows = connection.execute(
            sa.text(f"SELECT id, email FROM {table} WHERE id > :last ORDER BY id LIMIT :n"),  # noqa: S608
            {"last": last, "n": CHUNK},
        ).all()
        if not rows:
            return found
        last = rows[-1][0]
        found.extend((row[0], row[1], canonical(row[1])) for row in rows if row[1] and canonical(row[1]) != row[1])


def upgrade() -> None:
    connection = op.get_bind()
    for ident, _stored, spelled in _respelled(connection, "lead"):
        taken = connection.execute(sa.text("SELECT 1 FROM lead WHERE email = :e"), {"e": spelled}).first()
        if taken is None:
            connection.execute(sa.text("UPDATE lead SET email = :e WHERE id = :id"), {"e": spelled, "id": ident})
    for ident, _stored, spelled in _respelled(connection, "suppression"):
        digest = hashlib.sha256(spelled.encode("utf-8")).hexdigest()
        taken = connection.execute(sa.text("SELECT 1 FROM suppression WHERE email_hash = :h"), {"h": digest}).first()
        if taken is None:
            connection.execute(
                sa.text("UPDATE suppression SET email = :e, email_hash = :h WHERE id = :id"),
                {"e": spelled, "h": digest, "id": ident},
            )


def downgrade() -> None:
    """Nothing to undo: the canonical spelling is a valid spelling for earlier versions too."""
