"""The clients of the API load test: what the website and SendGrid send, and what they must not.

Each request is a :class:`Call` that knows the status it must get and what an
acknowledgement promises (events stored under their ids, addresses suppressed);
a client sends its calls and keeps a :class:`Tally` of the answers, so the load
test can hold the database to every promise the API made. Ids are unique per call,
so each acknowledged event can be counted exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nurture.api import SIGNATURE, TIMESTAMP
from nurture.inbound import SCORED, SUPPRESSING
from nurture.suppression import SUPPRESSING_KINDS
from nurture.unsubscribe import make_unsubscribe_token

JSON = "application/json"
# Website events, weighted like a site's traffic; the last three suppress their address
# (rare enough that most of the population is still mailed at the end of a minute).
SITE_KINDS = {
    "page_view": 40,
    "pricing_view": 15,
    "form_submit": 8,
    "webinar_attended": 4,
    "demo_request": 4,
    "email_open": 8,
    "email_click": 5,
    "purchase": 1,
    "unsubscribe": 0.25,
    "bounce": 0.1,
    "spamreport": 0.1,
}
# SendGrid events, weighted like a webhook's stream; 1% suppress.
SENDGRID_KINDS = {
    "open": 40,
    "click": 20,
    "processed": 10,
    "delivered": 10,
    "deferred": 2,
    "bounce": 0.4,
    "unsubscribe": 0.3,
    "spamreport": 0.15,
}
# Batches delivered twice at once, as SendGrid does when it retries a batch still being processed.
REPLAYS = 0.05
# A 503 is sent again after its Retry-After this many times before it counts as an error.
MAX_RETRIES = 10
# Addresses the site sends that nurture does not know yet: shared by all clients, so two
# clients create the same lead at the same moment.
WALK_INS = 40


@dataclass(frozen=True)
class Call:
    """One request, the status it must get, and what its acknowledgement promises."""

    what: str
    path: str
    body: bytes
    headers: Callable[[], dict[str, str]]
    expect: int
    events: tuple[tuple[str, str], ...] = ()  # (source, external id) stored when acknowledged
    suppresses: tuple[str, ...] = ()  # addresses suppressed when acknowledged
    bounced_messages: tuple[str, ...] = ()  # message ids SendGrid reported bounced
    bad_index: int | None = None  # the batch item the answer must name as an error
    # Sent again while the first delivery may still be in flight (SendGrid's retries, a site's
    # retry after a timeout): some or all of its events may already be stored.
    replay: bool = False


@dataclass
class Audience:
    """Who the traffic is about: leads by (id, address), and recent messages by (id, address)."""

    leads: list[tuple[int, str]]
    messages: list[tuple[int, str]] = field(default_factory=list)


class Webhook:
    """SendGrid's side of the Signed Event Webhook: an ECDSA P-256 key that signs each body."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.public_key = base64.b64encode(
            self._key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).decode()

    def signed(
        self, body: bytes, *, stamp: int | None = None, key: ec.EllipticCurvePrivateKey | None = None
    ) -> dict[str, str]:
        """Headers signing ``body`` now (SendGrid signs each delivery, retries included)."""
        timestamp = str(stamp if stamp is not None else int(time.time()))
        signature = (key or self._key).sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {SIGNATURE: base64.b64encode(signature).decode(), TIMESTAMP: timestamp, "Content-Type": JSON}


@dataclass
class Tally:
    """What the clients sent and what the answers promised."""

    requests: int = 0
    acknowledged: int = 0
    refused: int = 0  # 4xx, as each bad request must get
    retried: int = 0  # 503 with Retry-After, then sent again
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    events_acknowledged: dict[tuple[str, str], str] = field(default_factory=dict)
    suppressed_at: dict[str, datetime] = field(default_factory=dict)
    bounced_messages: set[str] = field(default_factory=set)
    # What the answers said they created, summed: the database must hold exactly that.
    leads_created: int = 0
    suppressions_added: int = 0

    def percentile(self, share: float) -> float:
        """The latency at ``share`` (0.95: p95), in milliseconds."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000 if ordered else 0.0


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


@dataclass
class Traffic:
    """Makes the calls of one client; ``tag`` keeps its ids apart from every other client's."""

    audience: Audience
    webhook: Webhook
    token: str
    secret: str
    max_body_bytes: int
    tag: str
    rng: random.Random
    sent: int = 0

    def next_call(self, now: datetime) -> Call:
        """A call drawn from the mix: events 50%, webhook 34%, one-click unsubscribe 1%, bad input 15%."""
        self.sent += 1
        draw = self.rng.random()
        if draw < 0.50:
            return self.site_events(now)
        if draw < 0.84:
            return self.sendgrid_events(now)
        if draw < 0.85:
            return self.one_click_unsubscribe(now)
        return self.bad_input(now)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": JSON}

    def site_events(self, now: datetime) -> Call:
        """A batch of 1–20 website events with unique ids; one in ten carries one bad item."""
        items, stored, suppressed = [], [], []
        for i in range(self.rng.randint(1, 20)):
            if self.rng.random() < 0.2:
                email = f"walk-in-{self.rng.randrange(WALK_INS)}@load.example"
            else:
                email = self.rng.choice(self.audience.leads)[1]
            kind = _pick(self.rng, SITE_KINDS)
            event_id = f"{self.tag}-{self.sent}-{i}"
            items.append(
                {"email": email, "kind": kind, "occurred_at": now.isoformat(), "id": event_id, "properties": {"n": i}}
            )
            stored.append(("api", event_id))
            if kind in SUPPRESSING_KINDS:
                suppressed.append(email)
        bad_index = None
        if self.rng.random() < 0.1:
            bad_index = self.rng.randrange(len(items) + 1)
            items.insert(bad_index, {"email": "not an address", "kind": "page_view", "id": f"{self.tag}-bad"})
        return Call(
            what="events batch",
            path="/v1/events",
            body=json.dumps({"events": items}).encode(),
            headers=self._auth,
            expect=200,
            events=tuple(stored),
            suppresses=tuple(suppressed),
            bad_index=bad_index,
        )

    def sendgrid_events(self, now: datetime) -> Call:
        """A signed batch of 1–20 SendGrid events for known leads, about their messages when there are any."""
        items, stored, suppressed, bounced = [], [], [], []
        for i in range(self.rng.randint(1, 20)):
            kind = _pick(self.rng, SENDGRID_KINDS)
            message_id = None
            if self.audience.messages and self.rng.random() < 0.6:
                message_id, email = self.rng.choice(self.audience.messages)
            else:
                email = self.rng.choice(self.audience.leads)[1]
            event_id = f"{self.tag}-{self.sent}-{i}"
            item: dict[str, object] = {
                "email": email,
                "timestamp": int(now.timestamp()),
                "event": kind,
                "sg_event_id": event_id,
                "sg_message_id": f"sg{self.tag}{self.sent}{i}.filter0001",
                "category": ["nurture"],
            }
            if message_id is not None:
                item["nurture_message_id"] = str(message_id)
                if kind == "bounce":
                    bounced.append(str(message_id))
            if kind == "bounce":
                item["reason"] = "550 5.1.1 The email account that you tried to reach does not exist"
            items.append(item)
            if kind in SCORED:
                stored.append(("sendgrid", event_id))
            if kind in SUPPRESSING:
                suppressed.append(email)
        body = json.dumps(items).encode()
        return Call(
            what="SendGrid webhook batch",
            path="/webhooks/sendgrid",
            body=body,
            headers=lambda: self.webhook.signed(body),
            expect=200,
            events=tuple(stored),
            suppresses=tuple(suppressed),
            bounced_messages=tuple(bounced),
        )

    def one_click_unsubscribe(self, now: datetime) -> Call:
        """RFC 8058 one-click unsubscribe from an email's header, for a known lead."""
        lead_id, email = self.rng.choice(self.audience.leads)
        token = make_unsubscribe_token(lead_id, email=email, now=now, secret=self.secret)
        return Call(
            what="one-click unsubscribe",
            path=f"/unsubscribe/{token}",
            body=b"List-Unsubscribe=One-Click",
            headers=lambda: {"Content-Type": "application/x-www-form-urlencoded"},
            expect=200,
            suppresses=(email,),
        )

    def bad_input(self, now: datetime) -> Call:
        """A request the API must refuse with its 4xx, storing nothing."""
        email = self.rng.choice(self.audience.leads)[1]
        event = {"email": email, "kind": "page_view", "occurred_at": now.isoformat(), "id": f"{self.tag}-x"}
        good = json.dumps({"events": [event]}).encode()
        signed_list = json.dumps([{"email": email, "event": "open", "timestamp": int(now.timestamp())}]).encode()
        stale = int(time.time()) - 3600
        forger = ec.generate_private_key(ec.SECP256R1())
        cases: list[tuple[str, str, bytes, Callable[[], dict[str, str]], int]] = [
            ("events without a token", "/v1/events", good, lambda: {"Content-Type": JSON}, 401),
            ("events with a wrong token", "/v1/events", good, lambda: {"Authorization": "Bearer nope"}, 401),
            ("events as text/plain", "/v1/events", good, lambda: {**self._auth(), "Content-Type": "text/plain"}, 415),
            ("events: malformed JSON", "/v1/events", good[:-3], self._auth, 400),
            ("events: nested 40 deep", "/v1/events", b"[" * 40 + b"]" * 40, self._auth, 400),
            ("events: no usable item", "/v1/events", b'{"events": [{"kind": "page_view"}, 5]}', self._auth, 422),
            ("events: a body too large", "/v1/events", b" " * (self.max_body_bytes + 1) + good, self._auth, 413),
            ("webhook without a signature", "/webhooks/sendgrid", signed_list, lambda: {"Content-Type": JSON}, 401),
            (
                "webhook signed by another key",
                "/webhooks/sendgrid",
                signed_list,
                lambda: self.webhook.signed(signed_list, key=forger),
                403,
            ),
            (
                "webhook: body changed after signing",
                "/webhooks/sendgrid",
                signed_list.replace(b"open", b"click"),
                lambda: self.webhook.signed(signed_list),
                403,
            ),
            (
                "webhook: signature an hour old",
                "/webhooks/sendgrid",
                signed_list,
                lambda: self.webhook.signed(signed_list, stamp=stale),
                403,
            ),
            (
                "webhook: an object, not a list",
                "/webhooks/sendgrid",
                b'{"event": "open"}',
                lambda: self.webhook.signed(b'{"event": "open"}'),
                400,
            ),
            ("unsubscribe: forged token", "/unsubscribe/MTIz.forged", b"", dict, 404),
        ]
        what, path, body, headers, status = self.rng.choice(cases)
        return Call(what=what, path=path, body=body, headers=headers, expect=status)


def _acknowledge(call: Call, answer: httpx.Response, tally: Tally) -> None:
    """Record what an acknowledgement promised; an answer that contradicts the call is an error."""
    tally.acknowledged += 1
    at = datetime.now(UTC)
    for key in call.events:
        tally.events_acknowledged[key] = call.what
    for email in call.suppresses:
        tally.suppressed_at.setdefault(email, at)
    tally.bounced_messages.update(call.bounced_messages)
    if call.path == "/v1/events":
        body = answer.json()
        stored, duplicates = body["accepted"], body["duplicates"]
        tally.leads_created += body["leads_created"]
        tally.suppressions_added += body["suppressions_added"]
        if call.bad_index is not None and [e["index"] for e in body["errors"]] != [call.bad_index]:
            tally.errors.append(f"{call.what}: item {call.bad_index} was bad, answer named {body['errors']}")
    elif call.path == "/webhooks/sendgrid":
        body = answer.json()
        stored, duplicates = body["events_stored"], body["duplicates"]
        tally.suppressions_added += body["suppressions_added"]
    else:
        return
    # Fresh ids are all new, unless the call is a replay: then each is new or a duplicate.
    if stored + duplicates != len(call.events) or (duplicates and not call.replay):
        tally.errors.append(f"{call.what}: {len(call.events)} events with fresh ids, answer {body}")


async def _send(http: httpx.AsyncClient, call: Call, tally: Tally) -> None:
    """Send ``call``; wait out a 503's Retry-After and send it again, a bounded number of times."""
    for _ in range(MAX_RETRIES + 1):
        started = time.perf_counter()
        try:
            answer = await http.post(call.path, content=call.body, headers=call.headers())
        except httpx.TransportError as exc:
            tally.errors.append(f"{call.what}: connection error {type(exc).__name__}: {exc}")
            return
        finally:
            tally.latencies.append(time.perf_counter() - started)
            tally.requests += 1
        retry_after = answer.headers.get("retry-after", "")
        if answer.status_code == 503 and retry_after.isdigit():
            tally.retried += 1
            await asyncio.sleep(int(retry_after))
            continue
        if answer.status_code != call.expect:
            tally.errors.append(f"{call.what}: expected {call.expect}, got {answer.status_code}: {answer.text[:300]}")
        elif call.expect >= 400:
            tally.refused += 1
        else:
            _acknowledge(call, answer, tally)
        return
    tally.errors.append(f"{call.what}: still 503 after {MAX_RETRIES} tries")


async def run_client(
    traffic: Traffic, api_url: str, now: Callable[[], datetime], deadline: float, tally: Tally
) -> None:
    """One client: its calls one after the other until ``deadline`` (time.monotonic()), some twice at once."""
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as http:
        while time.monotonic() < deadline:
            call = traffic.next_call(now())
            if call.events and traffic.rng.random() < REPLAYS:
                twin = replace(call, replay=True)
                await asyncio.gather(_send(http, twin, tally), _send(http, twin, tally))
            else:
                await _send(http, call, tally)
