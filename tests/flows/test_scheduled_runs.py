"""Schedules that fire: a *scheduled* run of the cycle and of dispatch completes, on a real Prefect server.

Registration alone proves nothing (Prefect 3.8's scheduler once failed on every loop
under SQLAlchemy 2.1 while every deployment looked fine), so each test waits for the
scheduler to create runs and for them to complete, with short intervals:
- `nurture serve` as a user starts it, without PREFECT_API_URL (it starts its own server);
- `prefect deploy --all` from prefect.yaml (intervals shortened) and a process worker;
- a server whose scheduler is off: `nurture serve` must say so and stop, not wait silently.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.suites import harness

BIN = Path(sys.executable).parent
NURTURE = str(BIN / "nurture")
PREFECT = str(BIN / "prefect")
SCHEDULED = {"nurture-cycle", "dispatch"}


def _env(workdir: Path, api: str | None) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(workdir / "prefect-client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "NURTURE_DATABASE_URL": f"sqlite:///{workdir / 'nurture.db'}",
        "NURTURE_OUTBOX_DIR": str(workdir / "outbox"),
        "NURTURE_PLAYBOOK": str(ROOT / "nurture.yaml"),
        "NURTURE_TEMPLATES": str(ROOT / "templates"),
    }
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    return env


def _run(args: list[str], env: dict[str, str], timeout: int = 300) -> str:
    result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _a_lead_that_turns_hot(env: dict[str, str], workdir: Path) -> None:
    """One lead whose demo request today makes the first cycle move it: proof the scheduled run did the work."""
    _run([NURTURE, "db", "upgrade"], env)
    (workdir / "leads.csv").write_text("email,job_title,company_size\nann@acme.example,CTO,500\n")
    today = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    (workdir / "events.csv").write_text(
        f"email,kind,occurred_at\nann@acme.example,demo_request,{today}\nann@acme.example,webinar_attended,{today}\n"
    )
    _run([NURTURE, "import", "leads", str(workdir / "leads.csv")], env)
    _run([NURTURE, "import", "events", str(workdir / "events.csv")], env)


def _transitions(workdir: Path) -> int:
    with sqlite3.connect(workdir / "nurture.db") as db:
        return int(db.execute("SELECT count(*) FROM stage_transition").fetchone()[0])


def _completed_scheduled_runs(api: str) -> dict[str, list[dict[str, Any]]]:
    """Completed runs the scheduler created (not started by hand), by deployment name."""
    with httpx.Client(base_url=api, timeout=60) as client:
        names = {d["id"]: d["name"] for d in client.post("/deployments/filter", json={}).json()}
        runs = client.post(
            "/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}, "limit": 200}
        ).json()
    found: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["auto_scheduled"] and run["deployment_id"] in names:
            found.setdefault(names[run["deployment_id"]], []).append(run)
    return found


def _wait_for_scheduled_runs(
    api: str, processes: list[subprocess.Popen[bytes]], logs: list[Path], seconds: float = 240
) -> dict[str, list[dict[str, Any]]]:
    deadline = time.monotonic() + seconds
    found: dict[str, list[dict[str, Any]]] = {}
    while time.monotonic() < deadline:
        for process, log in zip(processes, logs, strict=True):
            assert process.poll() is None, f"{log.name} exited {process.returncode}: {log.read_text()[-3000:]}"
        try:
            found = _completed_scheduled_runs(api)
        except httpx.TimeoutException:
            continue  # a busy SQLite-backed server answers late; the deadline still holds
        if set(found) >= SCHEDULED:
            return found
        time.sleep(2)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
    pytest.fail(f"no completed scheduled run of {sorted(SCHEDULED - set(found))} within {seconds:.0f} s\n{tails}")


def _answers(url: str, *, within: float) -> bool:
    """Whether the server at `url` still answers after `within` seconds of trying for it to go away."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
        except httpx.TransportError:
            return False
        time.sleep(0.5)
    return True


@pytest.fixture
def stop_at_end() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_nurture_serve_without_a_server_runs_the_cycle_and_dispatch_on_schedule(
    tmp_path: Path, stop_at_end: list[subprocess.Popen[bytes]]
) -> None:
    env = _env(tmp_path, api=None)  # as a user starts it: no PREFECT_API_URL
    _a_lead_that_turns_hot(env, tmp_path)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [NURTURE, "serve", "--cycle-every", "15s", "--dispatch-every", "10s", "--prefect-port", "0"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    stop_at_end.append(serve)
    deadline = time.monotonic() + 150
    while not (match := re.search(r"Runs: (http://127\.0\.0\.1:\d+)/runs", log.read_text())):
        assert serve.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    api = f"{match.group(1)}/api"

    runs = _wait_for_scheduled_runs(api, [serve], [log], seconds=300)

    assert {run["state_type"] for name in SCHEDULED for run in runs[name]} == {"COMPLETED"}
    assert _transitions(tmp_path) >= 1, "the scheduled cycle completed without moving the hot lead"
    # SIGTERM (systemd, docker stop) stops it cleanly, and its Prefect server with it.
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=90) == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    assert not _answers(f"{api}/health", within=30), "its Prefect server outlived `nurture serve`"


def test_prefect_deploy_and_a_worker_run_the_cycle_and_dispatch_on_schedule(
    tmp_path: Path, stop_at_end: list[subprocess.Popen[bytes]]
) -> None:
    with harness.prefect_server(tmp_path) as api:
        env = _env(tmp_path, api)
        _a_lead_that_turns_hot(env, tmp_path)
        # prefect.yaml as shipped, with intervals a test can wait for.
        declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())
        for deployment in declared["deployments"]:
            if deployment["name"] in SCHEDULED:
                deployment["schedules"] = [{"interval": 30 if deployment["name"] == "nurture-cycle" else 20}]
        prefect_file = tmp_path / "prefect.yaml"
        prefect_file.write_text(yaml.safe_dump(declared, sort_keys=False))
        _run([PREFECT, "work-pool", "create", "nurture", "--type", "process"], env)
        _run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)], env)
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "nurture", "--limit", "2"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        stop_at_end.append(worker)

        runs = _wait_for_scheduled_runs(api, [worker], [log], seconds=300)

        assert all(run["work_queue_name"] == "default" for name in SCHEDULED for run in runs[name])
        assert _transitions(tmp_path) >= 1, "the scheduled cycle completed without moving the hot lead"


def test_nurture_serve_stops_with_an_error_when_prefect_schedules_nothing(tmp_path: Path) -> None:
    with harness.prefect_server(tmp_path, {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}) as api:
        env = _env(tmp_path, api)
        _run([NURTURE, "db", "upgrade"], env)
        started = time.monotonic()
        result = subprocess.run(
            [NURTURE, "serve", "--cycle-every", "15s", "--dispatch-every", "10s", "--schedule-grace", "20s"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1, output[-3000:]
    assert time.monotonic() - started < 200
    assert (
        "Prefect has not scheduled any run of nurture-cycle, dispatch, rescore-all, nurture-report within" in output
    ), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
