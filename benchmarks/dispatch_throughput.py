"""Dispatch throughput: claim → render → send → record, against the raw SendGrid client.

Both runs post to the same loopback fake SendGrid (which validates every body
against the official schema) with the same number of threads, in the same
process, so the ratio shows what nurture's bookkeeping costs on top of the
bare client. Usage:

    uv run python -m benchmarks.dispatch_throughput [--messages 5000] [--threads 4]

Set NURTURE_BENCH_DATABASE_URL to measure on PostgreSQL (the tables are created
in a fresh schema of that database); the default is a temporary SQLite file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sendgrid import SendGridAPIClient
from sqlalchemy import create_engine, insert, text

from db.engine import get_engine, upgrade_schema
from db.models import Enrollment, Lead, Message, StageTransition
from flows.sending import Sender, dispatch_due
from nurture.playbook import ContactPolicy, load_playbook
from nurture.rendering import EmailRenderer, sample_context
from nurture.transports.base import OutgoingEmail
from nurture.transports.sendgrid_v3 import SendGridTransport, build_mail

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


@contextmanager
def _database_url(workdir: Path) -> Iterator[str]:
    """A temporary SQLite file, or a fresh schema in NURTURE_BENCH_DATABASE_URL, dropped afterwards."""
    base = os.environ.get("NURTURE_BENCH_DATABASE_URL")
    if not base:
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
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


def _raw_client(fake: FakeInAProcess, count: int, threads: int) -> float:
    """Seconds for the bare client to post ``count`` pre-built bodies."""
    playbook = load_playbook(ROOT / "nurture.yaml")
    rendered = EmailRenderer(ROOT / "templates").render(
        template="demo_offer", subject="See it on your own data", context=sample_context(playbook)
    )
    bodies = [
        build_mail(
            OutgoingEmail(
                message_id=i,
                idempotency_key=f"raw-{i}",
                to_email=f"lead{i}@bench.example",
                from_email="Acme <hello@acme.example>",
                subject=rendered.subject,
                html=rendered.html,
                text=rendered.text,
                unsubscribe_url="https://nurture.example/unsubscribe/x",
                category="demo_offer",
                custom_args={"nurture_message_id": str(i)},
            )
        ).get()
        for i in range(count)
    ]
    client = SendGridAPIClient(api_key=fake.api_key, host=fake.url)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda body: client.client.mail.send.post(request_body=body, timeout=10), bodies))
    return time.perf_counter() - started


def _dispatch(fake: FakeInAProcess, url: str, threads: int) -> tuple[float, int]:
    # The contact policy would hold some messages for quiet hours: off, to measure sending alone.
    playbook = load_playbook(ROOT / "nurture.yaml").model_copy(update={"contact_policy": ContactPolicy()})
    started = time.perf_counter()
    result = dispatch_due(
        engine=get_engine(url),
        playbook=playbook,
        renderer=EmailRenderer(ROOT / "templates"),
        transport=SendGridTransport(api_key=fake.api_key, host=fake.url),
        sender=Sender("Acme <hello@acme.example>", "Acme Inc., 1 Bench Street", "https://nurture.example", "k"),
        now=NOW + timedelta(minutes=1),
        clock=lambda: datetime.now(UTC),
        batch_size=1000,
        concurrency=threads,
    )
    return time.perf_counter() - started, result.by_status["sent"]


class FakeInAProcess:
    """The fake SendGrid in its own process, so it does not share this process's GIL."""

    api_key = "SG.bench-key"

    def __enter__(self) -> FakeInAProcess:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.fake_sendgrid", self.api_key],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self._process.stdout is not None
        self.url = self._process.stdout.readline().strip()
        return self

    def stats(self) -> dict[str, object]:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=10) as answer:
            return dict(json.load(answer))

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, FakeInAProcess() as fake, _database_url(Path(workdir)) as url:
        _queue(url, args.messages)
        _raw_client(fake, min(args.messages, 500), args.threads)  # warm up connections and code paths
        raw = _raw_client(fake, args.messages, args.threads)
        elapsed, sent = _dispatch(fake, url, args.threads)
        assert sent == args.messages, f"only {sent} of {args.messages} sent"
        stats = fake.stats()
        assert not stats["schema_errors"], stats["schema_errors"]
    engine = "PostgreSQL" if os.environ.get("NURTURE_BENCH_DATABASE_URL") else "SQLite"
    print(f"messages: {args.messages}, threads: {args.threads}, database: {engine}")
    print(f"raw sendgrid client (pre-built bodies): {raw:6.2f} s  {args.messages / raw:7.0f} msg/s")
    print(f"nurture dispatch (claim+render+send+record): {elapsed:6.2f} s  {sent / elapsed:7.0f} msg/s")
    print(f"dispatch time / raw client time: {elapsed / raw:.2f}x  (target ≤ 1.5x, ≥ 1000 msg/s)")


if __name__ == "__main__":
    main()
