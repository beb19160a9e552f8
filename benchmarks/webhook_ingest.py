"""Webhook ingestion: signed batches of 1,000 SendGrid events through a real `nurture api`.

Posts batches to ``nurture api`` running in its own process (uvicorn on
loopback), each signed with a real ECDSA key, and prints events per second next
to a bare bulk INSERT of the same event rows into a copy of the same database,
measured in the same run. Usage:

    .venv/bin/python -m benchmarks.webhook_ingest [--batches 10] [--batch-size 1000]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import insert

from db.engine import get_engine, session_scope, upgrade_schema
from db.imports import upsert_leads
from db.models import Event
from nurture.importing import LeadRecord

ROOT = Path(__file__).resolve().parents[1]
KINDS = [
    ("open", 40),
    ("click", 15),
    ("processed", 20),
    ("delivered", 20),
    ("deferred", 2),
    ("bounce", 2),
    ("unsubscribe", 1),
]


def _events(batches: int, size: int, leads: int) -> list[list[dict[str, object]]]:
    rng = random.Random(5)
    kinds = [k for k, weight in KINDS for _ in range(weight)]
    start = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp())
    return [
        [
            {
                "email": f"lead{rng.randrange(leads)}@bench.example",
                "timestamp": start + b * size + i,
                "event": rng.choice(kinds),
                "sg_event_id": f"ev-{b}-{i}",
                "sg_message_id": f"m{b}{i}.filter",
                "category": ["demo_offer"],
                "nurture_message_id": str(b * size + i),
            }
            for i in range(size)
        ]
        for b in range(batches)
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _database(path: Path, leads: int) -> str:
    url = f"sqlite:///{path}"
    engine = get_engine(url)
    upgrade_schema(engine)
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        upsert_leads(
            session=session, records=[LeadRecord(i, f"lead{i}@bench.example", {}, {}) for i in range(leads)], now=now
        )
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--leads", type=int, default=5000)
    args = parser.parse_args()
    key = ec.generate_private_key(ec.SECP256R1())
    public = base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).decode()
    batches = _events(args.batches, args.batch_size, args.leads)
    total = args.batches * args.batch_size
    with tempfile.TemporaryDirectory() as workdir:
        api_url = _database(Path(workdir) / "api.db", args.leads)
        bare_url = _database(Path(workdir) / "bare.db", args.leads)
        port = _free_port()
        env = {
            **os.environ,
            "NURTURE_DATABASE_URL": api_url,
            "SENDGRID_WEBHOOK_PUBLIC_KEY": public,
            "NURTURE_PLAYBOOK": str(ROOT / "nurture.yaml"),
            "NURTURE_TEMPLATES": str(ROOT / "templates"),
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "nurture.cli", "api", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                for _ in range(300):
                    try:
                        if client.get("/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.1)
                started = time.perf_counter()
                stored = 0
                for batch in batches:
                    body = json.dumps(batch).encode()
                    stamp = str(int(time.time()))
                    signature = base64.b64encode(key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
                    answer = client.post(
                        "/webhooks/sendgrid",
                        content=body,
                        headers={
                            "X-Twilio-Email-Event-Webhook-Signature": signature,
                            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
                            "Content-Type": "application/json",
                        },
                    )
                    answer.raise_for_status()
                    stored += answer.json()["events_stored"]
                api_seconds = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(timeout=10)

        engine = get_engine(bare_url)
        now = datetime.now(UTC)
        scored = {"open": "email_open", "click": "email_click", "bounce": "bounce", "unsubscribe": "unsubscribe"}
        started = time.perf_counter()
        for batch in batches:
            rows = [
                {
                    "lead_id": int(str(e["email"]).split("@")[0][4:]) + 1,
                    "kind": scored[str(e["event"])],
                    "occurred_at": datetime.fromtimestamp(int(str(e["timestamp"])), tz=UTC),
                    "source": "sendgrid",
                    "external_id": e["sg_event_id"],
                    "properties": {},
                    "applied": False,
                    "received_at": now,
                }
                for e in batch
                if e["event"] in scored
            ]
            with engine.begin() as conn:
                conn.execute(insert(Event), rows)
        bare_seconds = time.perf_counter() - started
    print(f"events: {total} in batches of {args.batch_size} ({stored} scoring events stored), database: SQLite")
    print(f"bare INSERT of the scoring rows:      {bare_seconds:6.2f} s  {total / bare_seconds:8.0f} events/s")
    print(f"signed webhook through `nurture api`: {api_seconds:6.2f} s  {total / api_seconds:8.0f} events/s")
    print(f"webhook time / bare insert time: {api_seconds / bare_seconds:.2f}x  (target ≥ 5000 events/s)")


if __name__ == "__main__":
    main()
