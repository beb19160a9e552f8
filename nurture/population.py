"""A seeded, realistic population of B2B SaaS leads and their behaviour, for the demo.

Each lead follows a persona: tire-kickers browse and leave, researchers read and
warm up, evaluators heat up and then either buy or go quiet and cool down,
returners come back weeks later. The same seed gives the same population, and
all addresses use the reserved ``.example`` domains: no real inbox is mailed.

Pure: ``start`` and ``end`` are parameters.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from nurture.importing import EventRecord, LeadRecord

FIRST_NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Daniel",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Isla",
    "Jonas",
    "Keira",
    "Luis",
    "Maya",
    "Noah",
    "Olivia",
    "Priya",
    "Quinn",
    "Rosa",
    "Samir",
    "Tara",
    "Umar",
    "Vera",
    "Wen",
    "Yusuf",
    "Zoe",
    "Amara",
    "Bruno",
    "Camille",
    "Dmitri",
    "Esther",
    "Felix",
    "Greta",
    "Hannah",
    "Ivan",
    "Jade",
]
LAST_NAMES = [
    "Anders",
    "Brooks",
    "Castillo",
    "Dubois",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Hughes",
    "Ito",
    "Jensen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Patel",
    "Quist",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Ueda",
    "Varga",
    "Walsh",
    "Xu",
    "Young",
    "Zimmer",
    "Haddad",
    "Novak",
    "Silva",
    "Chen",
]
COMPANY_WORDS = [
    "Blue",
    "North",
    "Bright",
    "Cedar",
    "Delta",
    "Echo",
    "Fern",
    "Granite",
    "Harbor",
    "Iron",
    "Juniper",
    "Kite",
    "Lumen",
    "Maple",
    "Nimbus",
    "Orbit",
    "Pine",
    "Quartz",
    "River",
    "Summit",
    "Tidal",
    "Vista",
]
COMPANY_SUFFIXES = ["Labs", "Systems", "Logistics", "Health", "Retail", "Software", "Bank", "Media", "Works", "Cloud"]
TITLES_SENIOR = ["VP Product", "Head of Growth", "Director of Analytics", "CTO", "Chief Marketing Officer", "Founder"]
TITLES_OTHER = [
    "Product Manager",
    "Data Analyst",
    "Marketing Manager",
    "Software Engineer",
    "Growth Marketer",
    "Customer Success Manager",
    "Student",
]
COUNTRIES = ["US", "US", "US", "GB", "DE", "CA", "FR", "NL", "AU", "IN", "BR", "ES"]
TIMEZONES = {
    "US": "America/New_York",
    "GB": "Europe/London",
    "DE": "Europe/Berlin",
    "CA": "America/Toronto",
    "FR": "Europe/Paris",
    "NL": "Europe/Amsterdam",
    "AU": "Australia/Sydney",
    "IN": "Asia/Kolkata",
    "BR": "America/Sao_Paulo",
    "ES": "Europe/Madrid",
}
INDUSTRIES = ["software", "saas", "fintech", "retail", "healthcare", "logistics", "media", "education"]
PAGES = ["/", "/product", "/features/funnels", "/features/retention", "/blog/activation", "/integrations", "/docs"]

PERSONAS = [("tire_kicker", 0.36), ("researcher", 0.24), ("evaluator", 0.16), ("buyer", 0.14), ("returner", 0.10)]


@dataclass(frozen=True, slots=True)
class Population:
    leads: list[LeadRecord]
    events: list[EventRecord]
    personas: dict[str, str]


def _pick_persona(rng: random.Random) -> str:
    roll, total = rng.random(), 0.0
    for name, share in PERSONAS:
        total += share
        if roll < total:
            return name
    return PERSONAS[-1][0]


def _lead(rng: random.Random, index: int) -> LeadRecord:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    company = f"{rng.choice(COMPANY_WORDS)} {rng.choice(COMPANY_SUFFIXES)}"
    free_mail = rng.random() < 0.15
    domain = "gmail.example" if free_mail else company.lower().replace(" ", "") + ".example"
    country = rng.choice(COUNTRIES)
    senior = rng.random() < 0.35
    profile = {
        "first_name": first,
        "last_name": last,
        "company": None if free_mail else company,
        "job_title": rng.choice(TITLES_SENIOR if senior else TITLES_OTHER),
        "company_size": rng.choice([5, 12, 30, 60, 120, 250, 800, 2500]),
        "country": country,
        "timezone": TIMEZONES.get(country, "UTC"),
    }
    email = f"{first}.{last}.{index}@{domain}".lower()
    attributes = {"industry": rng.choice(INDUSTRIES), "lead_source": rng.choice(["organic", "ads", "referral"])}
    return LeadRecord(line=index + 1, email=email, profile=profile, attributes=attributes)


class _Behaviour:
    def __init__(self, rng: random.Random, email: str, start: datetime, end: datetime) -> None:
        self.rng, self.email, self.start, self.end = rng, email, start, end
        self.events: list[EventRecord] = []

    def at(self, day: float) -> datetime:
        hour = self.rng.uniform(8, 19)
        return self.start + timedelta(days=int(day), hours=hour, minutes=self.rng.uniform(0, 59))

    def add(self, kind: str, day: float, **properties: str) -> None:
        when = self.at(day)
        if when < self.end:
            self.events.append(EventRecord(0, self.email, kind, when, dict(properties)))

    def browse(self, first_day: float, last_day: float, per_day: float, pricing_share: float = 0.0) -> None:
        day = first_day
        while day < last_day:
            for _ in range(self.rng.randint(0, max(int(per_day * 2), 1))):
                if self.rng.random() < pricing_share:
                    self.add("pricing_view", day, path="/pricing")
                else:
                    self.add("page_view", day, path=self.rng.choice(PAGES))
            day += self.rng.uniform(0.5, 2.5)


def generate_population(*, leads: int, start: datetime, end: datetime, seed: int = 7) -> Population:
    """``leads`` leads with event streams between ``start`` and ``end``."""
    rng = random.Random(seed)  # noqa: S311  (a reproducible demo, not a secret)
    days = (end - start).total_seconds() / 86400
    records: list[LeadRecord] = []
    events: list[EventRecord] = []
    personas: dict[str, str] = {}
    for index in range(leads):
        lead = _lead(rng, index)
        persona = _pick_persona(rng)
        personas[lead.email] = persona
        b = _Behaviour(rng, lead.email, start, end)
        first = rng.uniform(0, days * 0.3)
        if persona == "tire_kicker":
            b.browse(first, first + rng.uniform(1, 6), per_day=1.5)
        elif persona == "researcher":
            b.browse(first, first + days * 0.5, per_day=2.5, pricing_share=0.1)
            b.add("form_submit", first + rng.uniform(1, 6), form="ebook")
            if rng.random() < 0.5:
                b.add("webinar_attended", first + rng.uniform(8, 16))
        elif persona in {"evaluator", "buyer"}:
            peak = first + rng.uniform(5, 12)
            b.browse(first, peak + 5, per_day=4, pricing_share=0.25)
            b.add("form_submit", first + 2, form="trial")
            b.add("webinar_attended", peak - 2)
            b.add("demo_request", peak, source="pricing page")
            if persona == "buyer":
                b.browse(peak + 5, peak + 14, per_day=3, pricing_share=0.3)
                b.add("purchase", peak + rng.uniform(10, 18), plan=rng.choice(["team", "business"]))
        else:  # returner: warms early, goes quiet for weeks, comes back
            b.browse(0, 6, per_day=4, pricing_share=0.15)
            b.add("form_submit", 2, form="newsletter")
            b.add("webinar_attended", 4)
            back = days * rng.uniform(0.7, 0.85)
            b.browse(back, back + 5, per_day=4, pricing_share=0.3)
            b.add("demo_request", back + 3)
        for n, event in enumerate(b.events):
            events.append(
                EventRecord(
                    line=0,
                    email=event.email,
                    kind=event.kind,
                    occurred_at=event.occurred_at,
                    properties=event.properties,
                    external_id=f"demo-{seed}-{index}-{n}",
                )
            )
        records.append(lead)
    return Population(leads=records, events=events, personas=personas)


# How likely a person of each persona is to open an email they get, and to click it once opened.
ENGAGEMENT = {
    "tire_kicker": (0.20, 0.10),
    "researcher": (0.55, 0.35),
    "evaluator": (0.70, 0.45),
    "buyer": (0.75, 0.50),
    "returner": (0.45, 0.30),
}
# Leads reading in Apple Mail: Mail Privacy Protection opens every email for them within minutes.
APPLE_MAIL_SHARE = 0.25
# The shipped welcome's split test: variant b's subject gets more opens (so a report has something to find).
VARIANT_OPEN_LIFT = {"b": 1.3}
# The receiving server accepts every demo email this long after it left.
DELIVERY_DELAY = timedelta(seconds=4)


@dataclass(frozen=True, slots=True)
class SentEmail:
    """An email the demo's leads got: which message, to whom, when, and the split test's variant."""

    message_id: int
    email: str
    sent_at: datetime
    variant: str | None


def _seeded(*parts: object) -> random.Random:
    return random.Random("/".join(map(str, parts)))  # noqa: S311  (a reproducible demo, not a secret)


def _provider_event(email: SentEmail, kind: str, at: datetime, seed: int, n: int, **extra: Any) -> dict[str, Any]:
    """One event as SendGrid's webhook posts it, with the message id nurture put in ``custom_args``."""
    return {
        "email": email.email,
        "event": kind,
        "timestamp": int(at.timestamp()),
        "sg_event_id": f"demo-{seed}-{email.message_id}-{kind}-{n}",
        "sg_message_id": f"demo-{email.message_id}",
        "nurture_message_id": str(email.message_id),
        **extra,
    }


def engagement_events(sent: Iterable[SentEmail], *, personas: Mapping[str, str], seed: int = 7) -> list[dict[str, Any]]:
    """What the demo's leads do with their emails, as the SendGrid event webhook reports it: delivery,
    opens (Apple's machine opens flagged ``sg_machine_open``, as SendGrid does) and clicks. The same
    emails and seed give the same events."""
    events: list[dict[str, Any]] = []
    for email in sent:
        rng = _seeded(seed, "message", email.message_id)
        p_open, p_click = ENGAGEMENT.get(personas.get(email.email, ""), (0.3, 0.2))
        p_open = min(p_open * VARIANT_OPEN_LIFT.get(email.variant or "", 1.0), 0.95)
        events.append(_provider_event(email, "delivered", email.sent_at + DELIVERY_DELAY, seed, 3))
        if _seeded(seed, "apple", email.email).random() < APPLE_MAIL_SHARE:
            machine = email.sent_at + timedelta(minutes=rng.uniform(1, 20))
            events.append(_provider_event(email, "open", machine, seed, 0, sg_machine_open=True))
        if rng.random() < p_open:
            opened = email.sent_at + timedelta(hours=min(rng.expovariate(1 / 10), 96))
            events.append(_provider_event(email, "open", opened, seed, 1, sg_machine_open=False))
            if rng.random() < p_click:
                clicked = opened + timedelta(minutes=rng.uniform(0.5, 15))
                events.append(_provider_event(email, "click", clicked, seed, 2, url="https://acme-analytics.example/"))
    return events
