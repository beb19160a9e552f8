"""Unsubscribe tokens cannot be forged; the demo population is reproducible and varied."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from nurture.population import generate_population
from nurture.unsubscribe import make_unsubscribe_token, read_unsubscribe_token
from tests.conftest import T0


def test_tokens_round_trip_and_forgeries_fail() -> None:
    token = make_unsubscribe_token(42, secret="s3cret")
    assert read_unsubscribe_token(token, secret="s3cret") == 42
    assert read_unsubscribe_token(token, secret="other") is None
    forged = make_unsubscribe_token(43, secret="guess").split(".")[0] + "." + token.split(".")[1]
    assert read_unsubscribe_token(forged, secret="s3cret") is None
    for junk in ("", ".", "abc", "abc.def", token + "x"):
        assert read_unsubscribe_token(junk, secret="s3cret") is None


def test_population_is_seeded_and_uses_reserved_domains() -> None:
    a = generate_population(leads=200, start=T0, end=T0 + timedelta(weeks=6), seed=3)
    b = generate_population(leads=200, start=T0, end=T0 + timedelta(weeks=6), seed=3)
    assert a == b
    assert all(lead.email.endswith(".example") for lead in a.leads)
    assert all(T0 <= e.occurred_at < T0 + timedelta(weeks=6) for e in a.events)
    assert set(Counter(a.personas.values())) == {"tire_kicker", "researcher", "evaluator", "buyer", "returner"}
    assert {e.kind for e in a.events} >= {"page_view", "pricing_view", "form_submit", "demo_request", "purchase"}
