"""The API under load: concurrent clients and running cycles; no 500, no connection error, nothing lost.

For each engine: a fresh database with the demo's population, a real ``nurture api``
(uvicorn) on a free loopback port, and ``nurture run cycle`` run again and again
(a real Prefect server, the loopback fake SendGrid) while N async clients post for
S seconds: website event batches with unique ids (some suppress their address, some
name new addresses, a few carry one bad item), signed SendGrid webhook batches
(opens, clicks, bounces, unsubscribes, spam reports, processed and delivered, about
real messages once there are some), one-click unsubscribes, and bad input that must
get its 4xx (benchmarks/api_traffic.py); 5% of batches are delivered twice at once,
as SendGrid's retries are. A 503 with Retry-After is waited out and sent again, and
counted apart; any other 5xx, a wrong status or a connection error is an error. Then
one last cycle, and the checks against the database:

- every acknowledged event is stored exactly once (by its id) and scored by the cycle,
  and nothing is stored that was not acknowledged;
- the leads and suppressions the answers said they created are the ones stored;
- every address a suppressing event named is suppressed, and no email to it started
  after the suppression was acknowledged;
- tests/suites/invariants.py: nothing sent twice, nothing stuck or lost in the
  outbox, stage = last transition, the ledger's last row = the score.

    .venv/bin/python -m benchmarks.api_load --engine both --clients 20 --seconds 60
    # and with a migration blocking the event table, so the API answers 503 and clients retry:
    .venv/bin/python -m benchmarks.api_load --engine both --clients 20 --seconds 60 --migration 3 --lock-timeout 0.1

PostgreSQL needs NURTURE_TEST_DATABASE_URL. A fixed seed makes the traffic repeatable;
the interleaving with the cycles is not. Exits 1 on any error, loss or violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlmodel import col

from benchmarks.api_traffic import Audience, Tally, Traffic, Webhook, run_client
from db.engine import get_engine, session_scope
from db.models import Event, Lead, Message
from nurture.delivery import MessageStatus
from nurture.playbook import load_playbook
from tests.suites import harness
from tests.suites.invariants import Acknowledged, check, check_inbound

TOKEN = "load-site-token"
MAX_BODY_BYTES = 100_000
# Simulated time each cycle moves on: events arrive "now" in the cycles' timeline.
CYCLE_STEP = timedelta(minutes=20)


@dataclass
class SimulatedClock:
    """The cycles' ``now``: what the clients stamp their events with."""

    now: datetime = harness.NOW


@dataclass
class LoadReport(Tally):
    """One engine's run: what the clients saw (``Tally``) and what the database holds."""

    engine: str = ""
    clients: int = 0
    seconds: float = 0.0
    cycles: int = 0
    scored_during_load: int = 0  # acknowledged events the cycles scored while the clients were posting
    lost: int = 0
    duplicates: int = 0
    stored_unacknowledged: int = 0
    emails_sent: int = 0
    deadlocks: int | None = None  # PostgreSQL's count for the whole database while the run lasted
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.errors or self.lost or self.duplicates or self.violations)


async def _cycles(
    env: dict[str, str], logs: Path, clock: SimulatedClock, stop: asyncio.Event, report: LoadReport
) -> None:
    """``nurture run cycle`` again and again until ``stop``, each CYCLE_STEP later in simulated time."""
    while not stop.is_set():
        clock.now += CYCLE_STEP
        log_path = logs / f"cycle-{report.cycles + 1}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                harness.NURTURE,
                *["run", "cycle", "--now", clock.now.isoformat(), "--batch-size", "100"],
                env=env,
                cwd=harness.ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            code = await process.wait()
        report.cycles += 1
        if code not in (0, 2):
            report.errors.append(f"cycle {report.cycles} exited {code}: see {log_path}")


async def _recent_messages(reader: Engine, audience: Audience, stop: asyncio.Event) -> None:
    """Keep the webhook's messages current: SendGrid reports on messages that were sent."""

    def load() -> list[tuple[int, str]]:
        with reader.connect() as conn:
            query = (
                select(col(Message.id), col(Lead.email))
                .join(Lead, col(Lead.id) == col(Message.lead_id))
                .order_by(col(Message.id).desc())
                .limit(500)
            )
            return [(int(m), str(e)) for m, e in conn.execute(query)]

    while not stop.is_set():
        audience.messages = await asyncio.to_thread(load)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=2)


async def _migrations(database_url: str, hold: float, stop: asyncio.Event) -> None:
    """From the first second on, block writes to the event table for ``hold`` seconds out of every 2.5 × ``hold``,
    as a migration building an index does (PostgreSQL: CREATE INDEX takes SHARE; SQLite: any write takes the
    database's one write lock)."""
    url = make_url(database_url)

    def block() -> None:
        if url.get_backend_name() == "sqlite":
            conn = sqlite3.connect(str(url.database), isolation_level=None, timeout=60)
            try:
                conn.execute("BEGIN IMMEDIATE")
                time.sleep(hold)
                conn.execute("COMMIT")
            finally:
                conn.close()
            return
        holder = create_engine(url)
        try:
            with holder.begin() as conn:
                conn.execute(text("LOCK TABLE event IN SHARE MODE"))
                time.sleep(hold)
        finally:
            holder.dispose()

    pause = 1.0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=pause)
        if not stop.is_set():
            await asyncio.to_thread(block)
        pause = 1.5 * hold


async def _load(
    *,
    api_url: str,
    env: dict[str, str],
    logs: Path,
    audience: Audience,
    webhook: Webhook,
    seed: int,
    seconds: float,
    report: LoadReport,
    reader: Engine,
    migration_seconds: float | None,
) -> None:
    clock, stop = SimulatedClock(), asyncio.Event()
    background = [
        asyncio.create_task(_cycles(env, logs, clock, stop, report)),
        asyncio.create_task(_recent_messages(reader, audience, stop)),
    ]
    if migration_seconds:
        background.append(asyncio.create_task(_migrations(env["NURTURE_DATABASE_URL"], migration_seconds, stop)))
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    clients = [
        Traffic(
            audience, webhook, TOKEN, env["NURTURE_SECRET_KEY"], MAX_BODY_BYTES, f"c{i}", random.Random(seed * 1000 + i)
        )
        for i in range(report.clients)
    ]
    await asyncio.gather(*(run_client(t, api_url, lambda: clock.now, deadline, report) for t in clients))
    report.seconds = time.monotonic() - started
    stop.set()
    await asyncio.gather(*background)  # the cycle running now ends on its own


def _start_api(env: dict[str, str], log: Any) -> tuple[subprocess.Popen[bytes], str]:
    port = harness.free_port()
    process = harness.start(["api", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    harness.wait_for(f"{url}/healthz", process, 120, "nurture api")
    return process, url


def _scored(engine: Engine) -> int:
    """Events from the API the cycles have scored: proof that they ran while the clients posted."""
    with session_scope(engine) as session:
        query = select(func.count()).where(col(Event.source).in_(["api", "sendgrid"]), col(Event.applied).is_(True))
        return int(session.scalar(query) or 0)


def _deadlocks(admin_url: str | None) -> int | None:
    """Deadlocks PostgreSQL has broken in this database so far (every session's: the database may be shared)."""
    if admin_url is None:
        return None
    admin = create_engine(admin_url)
    try:
        with admin.connect() as conn:
            query = text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            return int(conn.execute(query).scalar_one())
    finally:
        admin.dispose()


def run_engine(
    *,
    kind: str,
    clients: int,
    seconds: float,
    seed: int,
    leads: int,
    prefect_api: str,
    workdir: Path,
    postgres_url: str | None,
    lock_timeout: float | None = None,
    migration_seconds: float | None = None,
) -> LoadReport:
    """One engine's run, from a fresh database to the verdict.

    ``migration_seconds`` blocks writes to the event table that long, again and again
    (see ``_migrations``); with a short ``lock_timeout`` (how long the API waits for a
    lock on PostgreSQL before it tries again) the API runs out of attempts and answers
    503 with Retry-After: the retry paths, end to end, under load.
    """
    report = LoadReport(engine=kind, clients=clients)
    logs = workdir / f"api-load-{kind}"
    logs.mkdir(parents=True, exist_ok=True)
    database = harness.fresh_database(kind, workdir, postgres_url)
    # Plain transactions: reading the messages must not take SQLite's write lock.
    reader = create_engine(database.url, connect_args={"check_same_thread": False} if kind == "sqlite" else {})
    webhook = Webhook()
    try:
        harness.populate(database.url, leads=leads, seed=seed)
        with session_scope(get_engine(database.url)) as session:
            audience = Audience(
                leads=[(int(i), str(e)) for i, e in session.execute(select(col(Lead.id), col(Lead.email)))]
            )
        with harness.fake_sendgrid(logs / "fake.log", latency=0.01, failure_rate=0.0, seed=seed) as sendgrid_url:
            env = harness.nurture_env(
                database_url=database.url, prefect_api=prefect_api, sendgrid_url=sendgrid_url, lease_seconds=60
            )
            env |= {
                "SENDGRID_WEBHOOK_PUBLIC_KEY": webhook.public_key,
                "NURTURE_API_TOKEN": TOKEN,
                "NURTURE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            }
            if lock_timeout is not None:
                env["NURTURE_API_LOCK_TIMEOUT_SECONDS"] = str(lock_timeout)
            with (logs / "api.log").open("wb") as api_log:
                api, api_url = _start_api(env, api_log)
                deadlocks_before = _deadlocks(database.admin_url)
                try:
                    asyncio.run(
                        _load(
                            api_url=api_url,
                            env=env,
                            logs=logs,
                            audience=audience,
                            webhook=webhook,
                            seed=seed,
                            seconds=seconds,
                            report=report,
                            reader=reader,
                            migration_seconds=migration_seconds,
                        )
                    )
                finally:
                    api.terminate()
                    api.wait(timeout=30)
                time.sleep(1)  # PostgreSQL publishes its statistics within a second
                deadlocks_after = _deadlocks(database.admin_url)
                if deadlocks_before is not None and deadlocks_after is not None:
                    report.deadlocks = deadlocks_after - deadlocks_before
            report.scored_during_load = _scored(get_engine(database.url))
            finish = SimulatedClock().now + CYCLE_STEP * (report.cycles + 1)
            harness.run_to_end(["run", "cycle", "--now", finish.isoformat()], env, logs / "finish-cycle.log")
            log = harness.fake_log(sendgrid_url)
        engine = get_engine(database.url)
        promised = Acknowledged(
            events=set(report.events_acknowledged),
            suppressed_at=report.suppressed_at,
            leads_created=report.leads_created,
            suppressions_added=report.suppressions_added,
            answers_lost=bool(report.errors),
        )
        inbound = check_inbound(engine=engine, acknowledged=promised, leads_before=len(audience.leads))
        report.lost, report.duplicates = inbound.lost, inbound.duplicates
        report.stored_unacknowledged = inbound.stored_unacknowledged
        report.violations.extend(inbound.violations)
        verdict = check(
            engine=engine,
            playbook=load_playbook(harness.ROOT / "nurture.yaml"),
            requested=log["requested"],
            accepted=log["accepted"],
            now=finish,
            in_doubt_bound=0,
            bounced=report.bounced_messages,
        )
        report.emails_sent = verdict.messages.get(MessageStatus.sent, 0)
        report.violations.extend(verdict.violations)
        return report
    finally:
        reader.dispose()
        database.drop()


def table(reports: list[LoadReport]) -> str:
    """The per-engine figures, one row each."""
    head = (
        f"{'engine':<11}{'clients':>8}{'seconds':>8}{'requests':>10}{'acknowl.':>10}{'events':>9}{'4xx ok':>8}"
        f"{'503 retried':>12}{'errors':>8}{'lost':>6}{'dupl.':>6}{'p50 ms':>8}{'p95 ms':>8}{'req/s':>7}"
        f"{'cycles':>7}{'scored':>7}{'emails':>7}{'violations':>11}{'deadlocks':>10}"
    )
    rows = [head]
    for r in reports:
        rows.append(
            f"{r.engine:<11}{r.clients:>8}{r.seconds:>8.0f}{r.requests:>10}{r.acknowledged:>10}"
            f"{len(r.events_acknowledged):>9}{r.refused:>8}{r.retried:>12}{len(r.errors):>8}{r.lost:>6}"
            f"{r.duplicates:>6}{r.percentile(0.5):>8.0f}{r.percentile(0.95):>8.0f}"
            f"{r.requests / max(r.seconds, 1e-9):>7.0f}{r.cycles:>7}{r.scored_during_load:>7}{r.emails_sent:>7}"
            f"{len(r.violations):>11}"
            f"{'-' if r.deadlocks is None else r.deadlocks:>10}"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--leads", type=int, default=300)
    parser.add_argument(
        "--lock-timeout", type=float, help="NURTURE_API_LOCK_TIMEOUT_SECONDS for the API (default: its own, 5)"
    )
    parser.add_argument(
        "--migration", type=float, help="block writes to the event table this many seconds, again and again"
    )
    parser.add_argument("--logs", type=Path, help="keep every process's log here (default: a temporary folder)")
    args = parser.parse_args()
    engines = ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]
    reports = []
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    folder = contextlib.nullcontext(str(args.logs)) if args.logs else tempfile.TemporaryDirectory(prefix="nurture-api-")
    with folder as tmp, harness.prefect_server(Path(tmp)) as api:
        for kind in engines:
            report = run_engine(
                kind=kind,
                clients=args.clients,
                seconds=args.seconds,
                seed=args.seed,
                leads=args.leads,
                prefect_api=api,
                workdir=Path(tmp),
                postgres_url=os.environ.get("NURTURE_TEST_DATABASE_URL"),
                lock_timeout=args.lock_timeout,
                migration_seconds=args.migration,
            )
            reports.append(report)
            for line in [*report.errors[:20], *report.violations[:20]]:
                print(f"  {kind}: {line}", flush=True)
    print(table(reports))
    raise SystemExit(0 if all(r.ok for r in reports) else 1)


if __name__ == "__main__":
    main()
