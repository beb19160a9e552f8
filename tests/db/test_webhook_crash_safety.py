"""Webhook dispatchers SIGKILLed at varied instants deliver each webhook exactly once, on both engines.

A real child process runs the dispatcher (tests/db/run_webhook_dispatcher.py) against a SQLite file
or a PostgreSQL schema, with many deliveries queued, towards a loopback receiver in this process
that records every request and answers after a short delay (so requests are in flight when the
kill comes). Each dispatcher is killed after a different number of requests plus a random delay;
then the leases run out and dispatchers run to their end. The receiver must have seen every
delivery id at most once; every delivery must be delivered, or in doubt (at most the requests in
flight at the kills) and never resent.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime

from sqlalchemy import Engine

from db.engine import session_scope
from db.models import WebhookDelivery
from db.webhooks import enqueue_deliveries
from nurture.playbook import parse_playbook
from nurture.webhooks import DeliveryStatus, PlannedDelivery, WebhookEvent, delivery_id
from tests.conftest import PLAYBOOK_PATH, ROOT, T0
from tests.db.world import World
from tests.fakes.webhook_receiver import Receiver, documented_verifier, webhook_receiver

SECRET = "whsec-crash-test"
LEASE_SECONDS = 1.5
CONCURRENCY = 4  # as tests/db/run_webhook_dispatcher.py runs it
DELIVERIES = 120
KILL_AFTER = (4, 25, 50, 80)  # requests the receiver has seen (in all) when each dispatcher is killed


def _start(database_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.db.run_webhook_dispatcher", database_url, SECRET, str(LEASE_SECONDS)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _queue(engine: Engine, url: str) -> None:
    world = World(engine, parse_playbook(PLAYBOOK_PATH.read_text()))
    emails = [f"lead{i}@northwind.example" for i in range(10)]
    for email in emails:
        world.lead(email, at=T0, first_name="Ann")
    ids = [world.row(email).id for email in emails]
    now = datetime.now(UTC)
    planned = []
    for n in range(DELIVERIES):
        key = f"lead.transitioned/transition-{n}/crash"
        ident = delivery_id(key)
        planned.append(
            PlannedDelivery(
                lead_id=int(ids[n % len(ids)] or 0),
                webhook="sales",
                url=url,
                event=WebhookEvent.transitioned,
                idempotency_key=key,
                delivery_id=ident,
                payload={"event": "lead.transitioned", "delivery_id": ident, "n": n},
                due_at=now,
            )
        )
    with session_scope(engine) as session:
        assert enqueue_deliveries(session=session, planned=planned, now=now) == DELIVERIES


def _wait_for(receiver: Receiver, count: int, process: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while receiver.count() < count and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)


def test_dispatchers_killed_at_varied_instants_deliver_each_webhook_exactly_once(
    engine: Engine, database_url: str
) -> None:
    rng = random.Random(20261124)
    with webhook_receiver(delay=0.02) as receiver:
        _queue(engine, f"{receiver.url}/hooks/sales")
        kills = 0
        for target in KILL_AFTER:
            process = _start(database_url)
            _wait_for(receiver, target, process)
            if process.poll() is None:
                time.sleep(rng.uniform(0.0, 0.03))
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.wait(timeout=60)
        time.sleep(LEASE_SECONDS + 0.5)  # the killed dispatchers' leases run out
        for _ in range(3):
            process = _start(database_url)
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr.decode()[-2000:]
            with session_scope(engine) as session:
                rows = session.query(WebhookDelivery).all()
                left = [r.id for r in rows if r.status in (DeliveryStatus.queued, DeliveryStatus.failed)]
            if not left:
                break
        received = receiver.ids()
        requests = list(receiver.requests)

    assert kills >= 3, "the dispatchers finished before they were killed: the test proved nothing"
    with session_scope(engine) as session:
        statuses = {r.delivery_id: r.status for r in session.query(WebhookDelivery).all()}
    by_status = Counter(statuses.values())
    assert set(by_status) <= {DeliveryStatus.delivered, DeliveryStatus.in_doubt}, by_status
    duplicates = {ident: n for ident, n in received.items() if n > 1}
    assert duplicates == {}, f"delivered more than once: {duplicates}"
    delivered = {ident for ident, status in statuses.items() if status == DeliveryStatus.delivered}
    in_doubt = {ident for ident, status in statuses.items() if status == DeliveryStatus.in_doubt}
    assert delivered <= set(received), "a delivery recorded as delivered never reached the receiver"
    assert set(received) <= delivered | in_doubt, "the receiver got a request the outbox does not know"
    assert len(in_doubt) <= CONCURRENCY * kills, (len(in_doubt), kills)
    assert len(delivered) + len(in_doubt) == DELIVERIES

    verify = documented_verifier()
    assert all(verify(SECRET, r.body, r.headers["nurture-signature"]) for r in requests)
