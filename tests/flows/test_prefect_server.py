"""The production path on a real `prefect server start`: deploy prefect.yaml, run a worker, read the API.

Also `nurture serve`, the embedded path. Both run as real processes on loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

PREFECT = str(Path(sys.executable).parent / "prefect")
NURTURE = str(Path(sys.executable).parent / "nurture")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A Prefect server on a free loopback port, and the environment that points at it."""
    home = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    log = (home / "server.log").open("w")
    process = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                pytest.fail(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        else:
            pytest.fail("prefect server did not answer within 120 s")
        yield api, env
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _nurture_env(env: dict[str, str], workdir: Path) -> dict[str, str]:
    return {
        **env,
        "NURTURE_DATABASE_URL": f"sqlite:///{workdir / 'nurture.db'}",
        "NURTURE_OUTBOX_DIR": str(workdir / "outbox"),
        "NURTURE_PLAYBOOK": str(ROOT / "nurture.yaml"),
        "NURTURE_TEMPLATES": str(ROOT / "templates"),
    }


def _run(args: list[str], env: dict[str, str], timeout: int = 300) -> str:
    result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_deploy_run_with_a_worker_and_read_the_artifacts(server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    api, env = server
    env = _nurture_env(env, tmp_path)
    _run([NURTURE, "db", "upgrade"], env)
    leads = tmp_path / "leads.csv"
    leads.write_text("email,job_title,company_size\nann@acme.example,CTO,500\n")
    events = tmp_path / "events.csv"
    events.write_text(
        "email,kind,occurred_at\nann@acme.example,demo_request,2026-01-05T10:00:00Z\n"
        "ann@acme.example,webinar_attended,2026-01-05T10:00:00Z\n"
    )
    _run([NURTURE, "import", "leads", str(leads)], env)
    _run([NURTURE, "import", "events", str(events)], env)
    _run([PREFECT, "work-pool", "create", "nurture", "--type", "process"], env)
    _run([PREFECT, "--no-prompt", "deploy", "--all"], env)

    with httpx.Client(base_url=api, timeout=30) as client:
        deployments = {d["name"]: d for d in client.post("/deployments/filter", json={}).json()}
        assert set(deployments) == {
            "nurture-cycle",
            "dispatch",
            "rescore-all",
            "advance-chunk",
            "import-leads",
            "import-events",
            "nurture-report",
        }
        cycle = deployments["nurture-cycle"]
        assert cycle["schedules"][0]["schedule"]["interval"] == 600
        assert cycle["global_concurrency_limit"]["limit"] == 1  # runs never overlap
        assert deployments["rescore-all"]["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert deployments["nurture-report"]["schedules"][0]["schedule"]["cron"] == "0 6 * * *"
        run = client.post(
            f"/deployments/{cycle['id']}/create_flow_run", json={"parameters": {"now": "2026-01-05T12:00:00+00:00"}}
        ).json()
        _run([PREFECT, "worker", "start", "--pool", "nurture", "--run-once"], env, timeout=600)
        state = client.get(f"/flow_runs/{run['id']}").json()
        assert state["state_type"] == "COMPLETED", state
        assert state["name"] == "cycle-2026-01-05T12:00Z"
        artifacts = client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
        assert {a["key"] for a in artifacts} == {
            "nurture-cycle-transitions",
            "nurture-funnel",
            "nurture-cycle-messages",
            "nurture-sequence-report",
        }
        transitions = next(a for a in artifacts if a["key"] == "nurture-cycle-transitions")
        assert "cold→warm 1" in transitions["description"]
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 1


def test_nurture_serve_registers_every_deployment_with_its_schedule(
    server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    api, env = server
    env = _nurture_env(env, tmp_path)
    _run([NURTURE, "db", "upgrade"], env)
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [NURTURE, "serve", "--timezone", "Europe/Berlin"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )

    def rescore_timezone(client: httpx.Client) -> object:
        found = client.post("/deployments/filter", json={"deployments": {"name": {"any_": ["rescore-all"]}}}).json()
        return found[0]["schedules"][0]["schedule"].get("timezone") if found and found[0]["schedules"] else None

    try:
        with httpx.Client(base_url=api, timeout=30) as client:
            # The deploy test may have registered the same deployments: wait for serve's own schedule.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and rescore_timezone(client) != "Europe/Berlin":
                assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
            assert rescore_timezone(client) == "Europe/Berlin", (tmp_path / "serve.log").read_text()[-3000:]
            names = {d["name"] for d in client.post("/deployments/filter", json={}).json()}
        assert names >= {"nurture-cycle", "dispatch", "rescore-all", "import-leads", "import-events", "nurture-report"}
    finally:
        process.terminate()  # stops cleanly within systemd's default 90 s, cancelling any run in progress
        try:
            assert process.wait(timeout=90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        finally:
            process.kill()
            log.close()
