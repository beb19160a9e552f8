"""Unsubscribe tokens cannot be forged, are bound to the address and dated; the demo population is
reproducible and varied."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections import Counter
from datetime import timedelta

import pytest

from nurture.errors import ConfigurationError
from nurture.population import generate_population
from nurture.settings import DEFAULT_SECRET_KEY, Settings, get_settings
from nurture.unsubscribe import UnsubscribeLink, claimed_lead_id, make_unsubscribe_token, read_unsubscribe_token
from tests.conftest import T0

ANN = "ann@northwind.example"
DAYS = 400


def _read(token: str, *, email: str = ANN, keys: tuple[str, ...] = ("s3cret",), days_later: int = 0) -> object:
    return read_unsubscribe_token(token, email=email, keys=keys, now=T0 + timedelta(days=days_later), link_days=DAYS)


def _v1(lead_id: int, secret: str) -> str:
    """A token as nurture made them before links were dated (the old make_unsubscribe_token)."""
    payload = base64.urlsafe_b64encode(str(lead_id).encode()).decode().rstrip("=")
    digest = hmac.new(secret.encode(), b"unsubscribe:" + payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(digest[:18]).decode().rstrip('=')}"


def test_tokens_round_trip_and_forgeries_fail() -> None:
    token = make_unsubscribe_token(42, email=ANN, now=T0, secret="s3cret")
    assert _read(token) == UnsubscribeLink(42, 2, 20514, expired=False)  # T0, 2026-03-02, is day 20,514
    assert claimed_lead_id(token) == 42
    assert _read(token, keys=("other",)) is None
    forged = make_unsubscribe_token(43, email=ANN, now=T0, secret="guess").rpartition(".")[0] + "." + token[-24:]
    assert _read(forged) is None
    for junk in ("", ".", "abc", "abc.def", token + "x", token[:-1], "2.42.0." + token[-24:], "2.042" + token[4:]):
        assert _read(junk) is None, junk


def test_a_token_is_bound_to_the_address_it_was_sent_to() -> None:
    """A token made for one person never matches the lead that has its id later, or has another address."""
    token = make_unsubscribe_token(42, email=ANN, now=T0, secret="s3cret")
    assert _read(token, email="cara@northwind.example") is None
    assert _read(token, email="ann@northwind.example.example") is None
    # The address is compared in its canonical form: the stored spelling does not matter.
    assert _read(token, email="ANN@Northwind.Example.") is not None


def test_a_token_is_short_enough_for_a_mail_header() -> None:
    typical = make_unsubscribe_token(1_234_567, email=ANN, now=T0, secret="s3cret")
    longest = make_unsubscribe_token(2**63 - 1, email="x" * 300 + "@x.example", now=T0, secret="s3cret")
    assert len(typical) == 40
    assert len(longest) == 52  # the largest id a lead can have
    with pytest.raises(ValueError, match="is not a lead id"):
        make_unsubscribe_token(0, email=ANN, now=T0, secret="s3cret")


def test_a_link_expires_after_the_configured_days_and_stays_authentic() -> None:
    token = make_unsubscribe_token(42, email=ANN, now=T0, secret="s3cret")
    on_the_last_day = _read(token, days_later=DAYS)
    a_day_later = _read(token, days_later=DAYS + 1)
    assert on_the_last_day == UnsubscribeLink(42, 2, 20514, expired=False)
    assert a_day_later == UnsubscribeLink(42, 2, 20514, expired=True)


def test_a_previous_key_verifies_links_it_signed_and_never_signs() -> None:
    old = make_unsubscribe_token(42, email=ANN, now=T0, secret="old key")
    new = make_unsubscribe_token(42, email=ANN, now=T0, secret="new key")
    assert _read(old, keys=("new key",)) is None
    assert _read(old, keys=("new key", "older key", "old key")) is not None
    assert _read(new, keys=("new key", "old key")) is not None
    settings = Settings(nurture_secret_key="new key", nurture_secret_key_previous=" old key ,older key,, new key")  # type: ignore[arg-type]
    assert settings.unsubscribe_keys == ("new key", "old key", "older key")
    assert Settings(nurture_secret_key="new key").unsubscribe_keys == ("new key",)  # type: ignore[arg-type]


def test_version_1_tokens_in_mailboxes_keep_working_with_the_current_and_previous_keys() -> None:
    assert _v1(42, "s3cret") == "NDI.EMspkrRCcSr0312nm2BZNd8l"  # what the old code made
    assert _read(_v1(42, "s3cret")) == UnsubscribeLink(42, 1, None, expired=False)
    assert _read(_v1(42, "old key"), keys=("new key", "old key")) == UnsubscribeLink(42, 1, None, expired=False)
    assert _read(_v1(42, "guess")) is None
    for payload in ("MDQy", "KzQy", "IDQy", "LTQy"):  # "042", "+42", " 42", "-42": signed, but not lead ids
        assert claimed_lead_id(f"{payload}.{_v1(42, 's3cret').partition('.')[2]}") is None


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"NURTURE_UNSUBSCRIBE_LINK_DAYS": "30"},
            "NURTURE_UNSUBSCRIBE_LINK_DAYS must be at least 60, not 30: an unsubscribe link must keep working",
        ),
        ({"NURTURE_UNSUBSCRIBE_LINK_DAYS": "a year"}, "NURTURE_UNSUBSCRIBE_LINK_DAYS: Input should be a valid integer"),
        (
            {"NURTURE_SECRET_KEY": "a real key", "NURTURE_SECRET_KEY_PREVIOUS": f"older,{DEFAULT_SECRET_KEY}"},
            "NURTURE_SECRET_KEY_PREVIOUS must not hold the development key",
        ),
    ],
)
def test_unsubscribe_settings_are_checked_with_the_variable_named(
    variables: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError) as caught:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert message in str(caught.value)
    assert "older" not in str(caught.value)  # no key in the message


def test_population_is_seeded_and_uses_reserved_domains() -> None:
    a = generate_population(leads=200, start=T0, end=T0 + timedelta(weeks=6), seed=3)
    b = generate_population(leads=200, start=T0, end=T0 + timedelta(weeks=6), seed=3)
    assert a == b
    assert all(lead.email.endswith(".example") for lead in a.leads)
    assert all(T0 <= e.occurred_at < T0 + timedelta(weeks=6) for e in a.events)
    assert set(Counter(a.personas.values())) == {"tire_kicker", "researcher", "evaluator", "buyer", "returner"}
    assert {e.kind for e in a.events} >= {"page_view", "pricing_view", "form_submit", "demo_request", "purchase"}


def test_the_demo_leads_open_and_click_as_sendgrid_reports_it() -> None:
    from nurture.inbound import parse_sendgrid_batch
    from nurture.population import SentEmail, engagement_events

    sent = [SentEmail(i, f"lead{i % 400}@northwind.example", T0, "ab"[i % 2]) for i in range(1, 4001)]
    personas = {f"lead{i}@northwind.example": "researcher" for i in range(400)}
    events = engagement_events(sent, personas=personas, seed=7)
    assert events == engagement_events(sent, personas=personas, seed=7)  # the same demo every time
    batch = parse_sendgrid_batch(events)
    assert len(batch.events) == len(events)
    assert {e.scoring_kind for e in batch.events} == {"email_open", "email_machine_open", "email_click", None}
    assert sum(e.event_type == "delivered" for e in batch.events) == len(sent)  # every email is delivered
    assert all(e.message_id is not None for e in batch.events)
    machine = {e["email"] for e in events if e.get("sg_machine_open")}
    assert 0.15 < len(machine) / 400 < 0.35  # Apple Mail readers: every email of theirs gets a machine open
    opened = Counter(
        "ab"[int(e["nurture_message_id"]) % 2] for e in events if e["event"] == "open" and not e.get("sg_machine_open")
    )
    assert opened["b"] > opened["a"] * 1.15  # the demo's variant b is the better subject line
    assert all(e["timestamp"] >= sent[0].sent_at.timestamp() for e in events)
