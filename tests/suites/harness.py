"""What the suites share: a Prefect server, a fake SendGrid process, a fresh database, nurture processes.

Everything runs for real on loopback: `prefect server start`, the fake SendGrid in
its own process (so it outlives the processes a suite kills), SQLite files or
fresh PostgreSQL schemas, and `nurture` commands as child processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import httpx
from sqlalchemy import create_engine, text

from db.engine import get_engine, session_scope, upgrade_schema
from db.imports import add_events, upsert_leads
from nurture.population import generate_population

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NURTURE = str(BIN / "nurture")
# Mid-afternoon in Europe, morning in the Americas: most leads are outside their quiet hours.
NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
API_KEY = "SG.suite-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen[bytes], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer within {seconds:.0f} s")


@contextmanager
def prefect_server(workdir: Path, settings: dict[str, str] | None = None) -> Iterator[str]:
    """A real `prefect server start` on a free loopback port (with extra Prefect `settings`); yields its API URL."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(workdir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **(settings or {}),
    }
    env.pop("PREFECT_API_URL", None)
    with (workdir / "prefect-server.log").open("wb") as log:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(f"{api}/health", process, 120, "prefect server")
            yield api
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


@contextmanager
def fake_sendgrid(log_path: Path, *, latency: float, failure_rate: float, seed: int) -> Iterator[str]:
    """The loopback fake SendGrid in its own process; yields its URL."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fakes.fake_sendgrid",
                API_KEY,
                f"--latency={latency}",
                f"--failure-rate={failure_rate}",
                f"--seed={seed}",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            assert process.stdout is not None
            url = process.stdout.readline().decode().strip()
            if not url.startswith("http"):
                raise RuntimeError(f"the fake SendGrid did not start: {log_path.read_text()[-2000:]}")
            yield url
        finally:
            process.kill()
            process.wait(timeout=10)


def fake_log(url: str) -> dict[str, list[str]]:
    """What the fake was asked (every request's message id) and what it accepted."""
    return dict(httpx.get(f"{url}/_log", timeout=30).json())


@dataclass
class Database:
    url: str
    cleanup_schema: str | None = None
    admin_url: str | None = None

    def drop(self) -> None:
        get_engine(self.url).dispose()
        if self.cleanup_schema and self.admin_url:
            admin = create_engine(self.admin_url)
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {self.cleanup_schema} CASCADE"))
            admin.dispose()


def fresh_database(kind: str, workdir: Path, postgres_url: str | None) -> Database:
    """A SQLite file, or a new schema in the PostgreSQL database, at the current schema."""
    if kind == "sqlite":
        database = Database(url=f"sqlite:///{workdir / f'nurture-{uuid.uuid4().hex[:8]}.db'}")
    else:
        if not postgres_url:
            raise RuntimeError("PostgreSQL trials need NURTURE_TEST_DATABASE_URL")
        schema = f"suite_{uuid.uuid4().hex[:10]}"
        admin = create_engine(postgres_url)
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        admin.dispose()
        separator = "&" if "?" in postgres_url else "?"
        database = Database(
            url=f"{postgres_url}{separator}options=-csearch_path%3D{schema}",
            cleanup_schema=schema,
            admin_url=postgres_url,
        )
    upgrade_schema(get_engine(database.url))
    return database


def populate(url: str, *, leads: int, seed: int) -> None:
    """The demo's population with six weeks of behaviour up to NOW."""
    engine = get_engine(url)
    population = generate_population(leads=leads, start=NOW - timedelta(weeks=6), end=NOW, seed=seed)
    with session_scope(engine) as session:
        upsert_leads(session=session, records=population.leads, now=NOW)
        add_events(session=session, records=population.events, now=NOW)


def nurture_env(*, database_url: str, prefect_api: str, sendgrid_url: str, lease_seconds: int) -> dict[str, str]:
    return {
        **os.environ,
        "NURTURE_DATABASE_URL": database_url,
        "NURTURE_PLAYBOOK": str(ROOT / "nurture.yaml"),
        "NURTURE_TEMPLATES": str(ROOT / "templates"),
        "NURTURE_TRANSPORT": "sendgrid",
        "SENDGRID_API_KEY": API_KEY,
        "SENDGRID_API_HOST": sendgrid_url,
        "NURTURE_SECRET_KEY": "suite-secret-key",
        "NURTURE_SEND_CONCURRENCY": "4",
        "NURTURE_SEND_LEASE_SECONDS": str(lease_seconds),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def start(args: list[str], env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([NURTURE, *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def run_to_end(args: list[str], env: dict[str, str], log_path: Path, timeout: float = 300) -> dict[str, Any]:
    """Run a nurture command to its end; its JSON summary (0 = clean, 2 = delivery problems reported)."""
    result = subprocess.run([NURTURE, *args], env=env, cwd=ROOT, capture_output=True, timeout=timeout, check=False)
    log_path.write_bytes(result.stdout + result.stderr)
    if result.returncode not in (0, 2):
        raise RuntimeError(f"`nurture {' '.join(args)}` exited {result.returncode}: {result.stderr[-2000:]!r}")
    return dict(json.loads(result.stdout))
