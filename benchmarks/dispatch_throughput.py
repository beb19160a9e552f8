"""Dispatch throughput at a real provider's latency: claim → render → send → record, against the raw SendGrid client.

Every run posts to the same loopback fake SendGrid, in its own process, which
validates every body against the official schema and answers each request
after ``--latency`` seconds (80 ms: a real round trip to SendGrid). With that
latency, throughput is requests in flight / round trip, so both engines run
with ``--in-flight`` requests in flight:

- the raw ``sendgrid`` client posting pre-built bodies, ``--in-flight`` threads
  each with its own ``SendGridAPIClient`` (a new connection per request: urllib);
- nurture's dispatch, on a temporary SQLite file and on PostgreSQL
  (NURTURE_BENCH_DATABASE_URL, default postgresql+psycopg://postgres@127.0.0.1:5432/test,
  in a fresh schema dropped afterwards), ``concurrency=--in-flight``.

It prints emails per second for each, the ratio to the raw client, and what the
fake saw: connections opened and the most requests in flight. Usage:

    .venv/bin/python -m benchmarks.dispatch_throughput [--messages 5000] [--latency 0.08] [--in-flight 128]
        [--engine both|sqlite|postgresql] [--profile FILE]

``--profile FILE`` writes cProfile statistics of the first dispatch (the
profiler itself slows it down: read the shares, not the rate).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sendgrid import SendGridAPIClient
from sqlalchemy import create_engine, insert, text

from db.engine import get_engine, upgrade_schema
from db.models import Enrollment, Lead, Message, StageTransition
from flows.sending import Sender, dispatch_due
from nurture.playbook import ContactPolicy, load_playbook
from nurture.rendering import EmailRenderer, sample_context
from nurture.transports import InMemoryTransport
from nurture.transports.base import OutgoingEmail
from nurture.transports.sendgrid_v3 import SendGridTransport, build_mail

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextmanager
def _database_url(engine: str, workdir: Path) -> Iterator[str]:
    """A temporary SQLite file, or a fresh schema in PostgreSQL, dropped afterwards."""
    if engine == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    base = os.environ.get("NURTURE_BENCH_DATABASE_URL") or DEFAULT_POSTGRES
    schema = f"nurture_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _queue(url: str, count: int) -> None:
    """``count`` leads, each with one due message (bulk inserts, like the cycle writes them)."""
    engine = get_engine(url)
    upgrade_schema(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(Lead),
            [
                {
                    "id": i + 1,
                    "email": f"lead{i}@bench.example",
                    "first_name": "Sam",
                    "company": "Bench Co",
                    "timezone": "UTC",
                    "attributes": {},
                    "stage": "hot",
                    "fit_score": 20.0,
                    "engagement": 60.0,
                    "score": 80.0,
                    "needs_rescore": False,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for i in range(count)
            ],
        )
        conn.execute(
            insert(StageTransition),
            [
                {
                    "id": i + 1,
                    "lead_id": i + 1,
                    "from_stage": "warm",
                    "to_stage": "hot",
                    "at": NOW,
                    "score": 80.0,
                    "reason": "bench",
                    "playbook_version": "bench",
                }
                for i in range(count)
            ],
        )
        conn.execute(
            insert(Enrollment),
            [
                {
                    "id": i + 1,
                    "key": f"bench-{i}",
                    "lead_id": i + 1,
                    "sequence": "demo_offer",
                    "stage": "hot",
                    "transition_id": i + 1,
                    "started_at": NOW,
                    "state": "active",
                    "steps_done": ["demo_offer"],
                }
                for i in range(count)
            ],
        )
        conn.execute(
            insert(Message),
            [
                {
                    "lead_id": i + 1,
                    "enrollment_id": i + 1,
                    "sequence": "demo_offer",
                    "step_id": "demo_offer",
                    "step": 0,
                    "template": "demo_offer",
                    "subject_template": "See {{ brand.name }} on your own data",
                    "idempotency_key": f"bench-{i}/step-0",
                    "status": "queued",
                    "due_at": NOW,
                    "attempts": 0,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for i in range(count)
            ],
        )


def _emails(count: int, key: str) -> list[OutgoingEmail]:
    """``count`` emails from one rendered step, as dispatch hands them to the transport."""
    playbook = load_playbook(ROOT / "nurture.yaml")
    rendered = EmailRenderer(ROOT / "templates").render(
        template="demo_offer", subject="See it on your own data", context=sample_context(playbook)
    )
    return [
        OutgoingEmail(
            message_id=i,
            idempotency_key=f"{key}-{i}",
            to_email=f"lead{i}@bench.example",
            from_email="Acme <hello@acme.example>",
            subject=rendered.subject,
            html=rendered.html,
            text=rendered.text,
            unsubscribe_url="https://nurture.example/unsubscribe/x",
            category="demo_offer",
            custom_args={"nurture_message_id": str(i)},
        )
        for i in range(count)
    ]


def _bodies(count: int) -> list[dict[str, object]]:
    """``count`` bodies built by the sendgrid helpers from one rendered email, as dispatch builds them."""
    return [build_mail(email).get() for email in _emails(count, "raw")]


def _raw_client(fake: FakeInAProcess, bodies: list[dict[str, object]], in_flight: int) -> float:
    """Seconds for the bare client to post pre-built bodies, ``in_flight`` threads each with its own client."""
    local = threading.local()

    def post(body: dict[str, object]) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = SendGridAPIClient(api_key=fake.api_key, host=fake.url)
        client.client.mail.send.post(request_body=body, timeout=30)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        list(pool.map(post, bodies))
    return time.perf_counter() - started


def _dispatch(fake: FakeInAProcess | None, url: str, in_flight: int, profile: str | None) -> tuple[float, int, int]:
    """Seconds to dispatch every queued message, how many were sent, and the connections the transport opened.

    Without a fake, through the in-memory transport: the bookkeeping alone.
    """
    # The contact policy would hold some messages for quiet hours: off, to measure sending alone.
    playbook = load_playbook(ROOT / "nurture.yaml").model_copy(update={"contact_policy": ContactPolicy()})
    transport: SendGridTransport | InMemoryTransport
    if fake is None:
        transport = InMemoryTransport()
    else:
        transport = SendGridTransport(api_key=fake.api_key, host=fake.url, timeout_seconds=30)
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    result = dispatch_due(
        engine=get_engine(url),
        playbook=playbook,
        renderer=EmailRenderer(ROOT / "templates"),
        transport=transport,
        sender=Sender("Acme <hello@acme.example>", "Acme Inc., 1 Bench Street", "https://nurture.example", "k"),
        now=NOW + timedelta(minutes=1),
        clock=lambda: datetime.now(UTC),
        batch_size=1000,
        concurrency=in_flight,
    )
    elapsed = time.perf_counter() - started
    if profiler is not None and profile:
        profiler.disable()
        profiler.dump_stats(profile)
    if isinstance(transport, InMemoryTransport):
        return elapsed, result.by_status["sent"], 0
    transport.close()
    return elapsed, result.by_status["sent"], transport.connections_opened


def _transport_only(fake: FakeInAProcess, count: int, in_flight: int) -> float:
    """Seconds for nurture's SendGrid transport alone (body built, pooled request) to send ``count`` emails."""
    emails = _emails(count, "t")
    transport = SendGridTransport(api_key=fake.api_key, host=fake.url, timeout_seconds=30)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        list(pool.map(transport.send, emails))
    elapsed = time.perf_counter() - started
    transport.close()
    return elapsed


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


@contextmanager
def _measured(fake: FakeInAProcess, count: int, into: dict[str, float]) -> Iterator[None]:
    """CPU microseconds per email of this process and of the fake, while the block runs."""
    mine, theirs = _cpu(), fake.cpu_seconds()
    yield
    into["cpu_us"] = (_cpu() - mine) / count * 1e6
    into["fake_cpu_us"] = (fake.cpu_seconds() - theirs) / count * 1e6


class FakeInAProcess:
    """The fake SendGrid in its own process, so it does not share this process's GIL."""

    api_key = "SG.bench-key"

    def __init__(self, latency: float) -> None:
        self.latency = latency

    def __enter__(self) -> FakeInAProcess:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.fake_sendgrid", self.api_key, "--latency", str(self.latency)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self._process.stdout is not None
        self.url = self._process.stdout.readline().strip()
        return self

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=10) as answer:
            return dict(json.load(answer))

    def cpu_seconds(self) -> float:
        """CPU seconds the fake's process has used (Linux /proc; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_counts(self) -> None:
        with urllib.request.urlopen(f"{self.url}/_reset_counts", timeout=10) as answer:
            answer.read()

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--latency", type=float, default=0.08, help="seconds the fake takes to answer")
    parser.add_argument("--in-flight", type=int, default=128, help="requests in flight, for both engines")
    parser.add_argument("--engine", choices=["both", "sqlite", "postgresql"], default="both")
    parser.add_argument("--profile", help="write cProfile statistics of the first dispatch to this file")
    args = parser.parse_args()
    engines = ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]
    print(f"messages: {args.messages}, latency: {args.latency * 1000:.0f} ms, in flight: {args.in_flight}")
    print(f"ceiling at this latency: {args.in_flight / args.latency:,.0f} emails/s (in flight / round trip)")
    rows: list[tuple[str, float, dict[str, Any]]] = []
    cpu: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as workdir, FakeInAProcess(args.latency) as fake:
        bodies = _bodies(args.messages)
        _raw_client(fake, bodies[: min(args.messages, 2 * args.in_flight)], args.in_flight)  # warm up
        fake.reset_counts()
        with _measured(fake, args.messages, cpu.setdefault("raw", {})):
            raw = _raw_client(fake, bodies, args.in_flight)
        rows.append(("raw sendgrid client (pre-built bodies)", args.messages / raw, fake.stats()))
        fake.reset_counts()
        with _measured(fake, args.messages, cpu.setdefault("transport", {})):
            alone = _transport_only(fake, args.messages, args.in_flight)
        rows.append(("nurture's transport alone (build + pooled post)", args.messages / alone, fake.stats()))
        profile = args.profile
        for engine in engines:
            label = "PostgreSQL" if engine == "postgresql" else "SQLite"
            with _database_url(engine, Path(workdir)) as url:
                _queue(url, args.messages)
                fake.reset_counts()
                with _measured(fake, args.messages, cpu.setdefault(label, {})):
                    elapsed, sent, opened = _dispatch(fake, url, args.in_flight, profile)
                profile = None
                assert sent == args.messages, f"only {sent} of {args.messages} sent"
                stats = fake.stats()
                assert stats["connections"] == opened, stats
                rows.append((f"nurture dispatch, {label} (claim+render+send+record)", sent / elapsed, stats))
            with _database_url(engine, Path(workdir) / "memory") as url:  # the bookkeeping alone
                _queue(url, args.messages)
                with _measured(fake, args.messages, cpu.setdefault(f"{label} in memory", {})):
                    elapsed, sent, _ = _dispatch(None, url, args.in_flight, None)
                cpu[f"{label} in memory"]["rate"] = sent / elapsed
        assert not fake.stats()["schema_errors"], fake.stats()["schema_errors"]
    raw_rate = rows[0][1]
    for label, rate, stats in rows:
        print(
            f"{label:54} {rate:7,.0f} emails/s  {rate / raw_rate:5.2f}x raw  "
            f"connections {stats['connections']:5}  requests {stats['requests']:5}  "
            f"max in flight {stats['max_in_flight']}"
        )
    print("CPU per email, µs (this process / the fake's process):")
    for name, figures in cpu.items():
        rate = f"  ({figures['rate']:,.0f} emails/s, no HTTP)" if "rate" in figures else ""
        print(f"  {name:22} {figures['cpu_us']:6.0f} / {figures['fake_cpu_us']:4.0f}{rate}")
    best = max(rate for label, rate, _ in rows if label.startswith("nurture dispatch"))
    print(f"target: ≥ 1,000 emails/s from one dispatcher: {'met' if best >= 1000 else 'missed'} ({best:,.0f})")


if __name__ == "__main__":
    main()
