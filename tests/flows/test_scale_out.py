"""Scale out for real: one Prefect server on PostgreSQL, one process work pool, two `prefect worker start`.

A cycle with ``fan_out`` cuts its candidates into ranges and starts one advance-chunk
flow run per range; both workers take chunks. Two dispatch runs compete with the
cycle's own dispatch step for the messages it queued. Nothing may happen twice:
one transition per lead and time, one enrollment per transition and sequence, one
email per message (the loopback fake SendGrid counts them).

PostgreSQL only (the app database and Prefect's); ~1–2 minutes: `pytest -m scale_out`.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import create_engine, func, select, text
from sqlmodel import col

from db.chunks import candidate_ranges
from db.engine import get_engine, session_scope
from db.models import Enrollment, Message, StageTransition
from tests.conftest import ROOT, postgres_url
from tests.suites import harness

pytestmark = [pytest.mark.postgres, pytest.mark.scale_out]

DEPLOYED = ("nurture-cycle", "advance-chunk", "dispatch")
BATCH = 300
LEADS = 2000
WORKERS = ("worker-a", "worker-b")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def prefect_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the Prefect server's own tables; its asyncpg URL."""
    base = postgres_url()
    if base is None:
        pytest.skip("NURTURE_TEST_DATABASE_URL is not set: the scale-out test needs PostgreSQL")
    name = f"prefect_scale_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = admin.url.set(drivername="postgresql+asyncpg", database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _run(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _deploy(env: dict[str, str], workdir: Path) -> None:
    """prefect.yaml as shipped, the three deployments under test only, without schedules (runs start by hand)."""
    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    declared["deployments"] = [d for d in declared["deployments"] if d["name"] in DEPLOYED]
    for deployment in declared["deployments"]:
        deployment.pop("schedules", None)
    prefect_file = workdir / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(declared, sort_keys=False))
    prefect = str(harness.BIN / "prefect")
    _run([prefect, "work-pool", "create", "nurture", "--type", "process"], env)
    _run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)], env)


def _start_run(client: httpx.Client, deployment_id: str, parameters: dict[str, Any]) -> str:
    answer = client.post(f"/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters})
    answer.raise_for_status()
    return str(answer.json()["id"])


def _wait_final(
    client: httpx.Client, ids: list[str], workers: list[subprocess.Popen[bytes]], logs: list[Path], seconds: float
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while True:
        for worker, log in zip(workers, logs, strict=True):
            assert worker.poll() is None, f"{log.name} exited: {log.read_text()[-3000:]}"
        runs = client.post("/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}).json()
        if len(runs) == len(ids) and all(
            r["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} for r in runs
        ):
            return {r["id"]: r for r in runs}
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
            pytest.fail(f"runs not finished within {seconds:.0f} s: {[r['state_type'] for r in runs]}\n{tails}")
        time.sleep(1)


def test_two_workers_share_the_chunks_and_nothing_runs_twice(
    tmp_path: Path, prefect_database: str, processes: list[subprocess.Popen[bytes]]
) -> None:
    database = harness.fresh_database("postgresql", tmp_path, postgres_url())
    try:
        harness.populate(database.url, leads=LEADS, seed=3)
        engine = get_engine(database.url)
        with session_scope(engine) as session:
            chunks = len(candidate_ranges(session=session, now=harness.NOW, size=BATCH))
        assert chunks >= 6  # ceil(candidates / batch_size) chunk runs

        server_settings = {"PREFECT_API_DATABASE_CONNECTION_URL": prefect_database}
        with (
            harness.prefect_server(tmp_path, server_settings) as api,
            harness.fake_sendgrid(tmp_path / "sendgrid.log", latency=0.02, failure_rate=0.0, seed=1) as sendgrid,
        ):
            env = {
                **harness.nurture_env(
                    database_url=database.url, prefect_api=api, sendgrid_url=sendgrid, lease_seconds=600
                ),
                # One home for the workers' runs: a chunk's result is read back by its parent from its storage.
                "PREFECT_HOME": str(tmp_path / "prefect-client"),
                "PREFECT_WORKER_QUERY_SECONDS": "2",
                "NURTURE_SEND_CONCURRENCY": "2",
            }
            _deploy(env, tmp_path)
            logs = [tmp_path / f"{name}.log" for name in WORKERS]
            for name, log in zip(WORKERS, logs, strict=True):
                with log.open("wb") as out:
                    processes.append(
                        subprocess.Popen(
                            [
                                str(harness.BIN / "prefect"),
                                "worker",
                                "start",
                                "--pool",
                                "nurture",
                                "--name",
                                name,
                                "--limit",
                                "4",
                            ],
                            env=env,
                            cwd=ROOT,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    )

            with httpx.Client(base_url=api, timeout=60) as client:
                deployments = {d["name"]: d["id"] for d in client.post("/deployments/filter", json={}).json()}
                assert set(deployments) == set(DEPLOYED)
                now = harness.NOW.isoformat()
                cycle = _start_run(
                    client,
                    deployments["nurture-cycle"],
                    {"now": now, "batch_size": BATCH, "fan_out": True, "dispatch": True},
                )
                # Two dispatchers beside the cycle's own dispatch step, as soon as there is something to send.
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline:
                    with session_scope(engine) as session:
                        if session.scalar(select(func.count(col(Message.id)))):
                            break
                    time.sleep(0.5)
                dispatchers = [
                    _start_run(client, deployments["dispatch"], {"now": now, "batch_size": 40}) for _ in range(2)
                ]
                parents = _wait_final(client, [cycle, *dispatchers], processes, logs, seconds=300)
                children = client.post(
                    "/flow_runs/filter",
                    json={"flow_runs": {"deployment_id": {"any_": [deployments["advance-chunk"]]}}},
                ).json()
            log = harness.fake_log(sendgrid)
    finally:
        get_engine(database.url).dispose()

    try:
        assert {run_id: run["state_type"] for run_id, run in parents.items()} == dict.fromkeys(parents, "COMPLETED")
        # Every chunk ran as its own flow run, completed, and both workers took some.
        assert len(children) == chunks
        assert {c["state_type"] for c in children} == {"COMPLETED"}
        assert sorted(c["name"] for c in children) == sorted(
            f"advance-leads-{k}/{chunks}" for k in range(1, chunks + 1)
        )
        by_worker = Counter(c["labels"].get("prefect.worker.name") for c in children)
        assert set(by_worker) == set(WORKERS), by_worker

        engine = get_engine(database.url)
        with session_scope(engine) as session:
            transitions = session.execute(
                select(col(StageTransition.lead_id), col(StageTransition.at), func.count())
                .group_by(col(StageTransition.lead_id), col(StageTransition.at))
                .having(func.count() > 1)
            ).all()
            moved = session.scalar(select(func.count(func.distinct(col(StageTransition.lead_id)))))
            enrollments = session.execute(
                select(col(Enrollment.transition_id), col(Enrollment.sequence), func.count())
                .group_by(col(Enrollment.transition_id), col(Enrollment.sequence))
                .having(func.count() > 1)
            ).all()
            enrolled = session.scalar(select(func.count(col(Enrollment.id))))
            sent = [
                (str(i), provider)
                for i, provider in session.execute(
                    select(col(Message.id), col(Message.provider_message_id)).where(col(Message.status) == "sent")
                )
            ]
            left_in_flight = session.scalar(
                select(func.count(col(Message.id))).where(col(Message.status).in_(["sending", "in_doubt"]))
            )
        assert moved is not None
        assert moved > LEADS // 10, "the cycle moved too few leads to prove anything"
        assert transitions == []  # each lead's transition recorded once
        assert enrolled
        assert enrollments == []  # each enrollment once
        assert len(sent) > 50
        # Each message went out exactly once: the provider saw each id once, and saw exactly the sent ones.
        assert Counter(log["requested"]).most_common(1)[0][1] == 1
        assert sorted(log["accepted"]) == sorted(i for i, _ in sent)
        assert len({provider for _, provider in sent}) == len(sent)
        assert left_in_flight == 0
    finally:
        database.drop()
        get_engine.cache_clear()
