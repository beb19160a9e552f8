"""One address, one spelling: Unicode forms, a trailing dot and punycode domains are one person everywhere an
address comes in."""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nurture.importing import canonical_address, event_record, lead_record, normalise_email
from nurture.inbound import parse_api_events, parse_sendgrid_batch
from nurture.privacy import email_hash
from tests.conftest import T0

NFC = "josé@f.example"
NFD = "jose\u0301@f.example"

# Each is the same mailbox as its canonical spelling, written another way.
SPELLINGS = [
    (NFD, NFC),
    ("JOSE\u0301@F.EXAMPLE", NFC),
    ("ann@f.example.", "ann@f.example"),
    (" Ann@F.Example. ", "ann@f.example"),
    ("josé@xn--bcher-kva.example", "josé@bücher.example"),
    ("JOSÉ@XN--BCHER-KVA.EXAMPLE.", "josé@bücher.example"),
    ("jose\u0301@bu\u0308cher.example", "josé@bücher.example"),
    ("ann@mail.xn--mnchen-3ya.example", "ann@mail.münchen.example"),
]


@pytest.mark.parametrize(("spelling", "canonical"), SPELLINGS)
def test_every_spelling_of_an_address_normalises_to_one(spelling: str, canonical: str) -> None:
    assert normalise_email(spelling) == canonical
    assert email_hash(normalise_email(spelling)) == email_hash(canonical)


@pytest.mark.parametrize("canonical", sorted({c for _, c in SPELLINGS} | {"jörg.müller@bücher.example"}))
def test_the_canonical_spelling_is_a_fixed_point(canonical: str) -> None:
    assert normalise_email(canonical) == canonical
    assert canonical_address(canonical) == canonical
    assert unicodedata.is_normalized("NFC", canonical)


@pytest.mark.parametrize(
    "address",
    [
        "ann@f.example..",  # one trailing dot is the DNS root; two are a mistake
        "ann@.",
        "a\u037eb@f.example",  # a Greek question mark is a semicolon in NFC
    ],
)
def test_what_only_looks_like_an_address_is_still_refused(address: str) -> None:
    with pytest.raises(ValueError, match="is not an email address"):
        normalise_email(address)


@pytest.mark.parametrize(
    "address",
    [
        "ann@xn--zzzz-.example",  # decodes to ASCII: not a real punycode label
        "ann@xn--abc.example",  # decodes to control characters
        "ann@xn--bcher-kvb.example",  # decodes to "bcǈher", with a capital: no domain is written so
    ],
)
def test_a_punycode_label_is_converted_only_when_it_is_the_exact_spelling_of_a_unicode_one(address: str) -> None:
    assert normalise_email(address) == address


def test_an_error_quotes_the_address_as_it_was_given() -> None:
    with pytest.raises(ValueError, match=r"'ANN@F.EXAMPLE..' is not an email address"):
        normalise_email("ANN@F.EXAMPLE..")


def test_every_way_in_normalises_the_address_the_same_way() -> None:
    """Import files, the events API and SendGrid's webhook all store the canonical spelling."""
    assert lead_record(2, {"email": NFD}).email == NFC
    event = {"email": "ann@f.example.", "kind": "unsubscribe", "occurred_at": T0.isoformat()}
    assert event_record(2, event).email == "ann@f.example"
    records, errors = parse_api_events({"email": NFD, "kind": "unsubscribe"}, now=T0)
    assert errors == []
    assert [r.email for r in records] == [NFC]
    batch = parse_sendgrid_batch(
        json.loads(json.dumps([{"email": "josé@xn--bcher-kva.example.", "event": "bounce", "timestamp": 1772442000}]))
    )
    assert [e.email for e in batch.events] == ["josé@bücher.example"]


_LOCAL = st.text(st.sampled_from("abcezos.+_-éèöüßñçøåǆſ\u0301\u0308"), min_size=1, max_size=12)
_LABEL = st.text(st.sampled_from("abcdefmnü\u0308é-"), min_size=1, max_size=10)


@given(local=_LOCAL, labels=st.lists(_LABEL, min_size=1, max_size=3))
def test_every_spelling_of_an_address_is_one_person(local: str, labels: list[str]) -> None:
    """Generated: NFC or NFD, any case, a trailing dot, punycode labels: one canonical spelling, or refused alike."""
    address = f"{local}@{'.'.join(labels)}.example"
    try:
        canonical = normalise_email(address)
    except ValueError:
        for form in ("NFC", "NFD"):
            with pytest.raises(ValueError, match=r"not an email address|characters long"):
                normalise_email(unicodedata.normalize(form, address))
        return
    assert normalise_email(canonical) == canonical  # already canonical: unchanged
    domain = canonical.rpartition("@")[2]
    punycode = ".".join(
        label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii") for label in domain.split(".")
    )
    spellings = [
        unicodedata.normalize("NFD", address),
        "".join(c.upper() if c.isascii() else c for c in address),  # as typed with caps lock
        address + ".",
        f"{canonical.rpartition('@')[0]}@{punycode}",
    ]
    for spelling in spellings:
        assert normalise_email(spelling) == canonical, spelling
        assert email_hash(normalise_email(spelling)) == email_hash(canonical)
