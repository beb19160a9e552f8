"""A Prefect API for nurture's commands: the configured one, or a server that lives and dies with the command.

Without `PREFECT_API_URL`, Prefect starts a temporary server of its own for a
flow run, which outlives a killed command (a SIGKILL leaves it running, holding
memory) and has no scheduler. nurture starts these servers itself instead, with
Linux's parent-death signal so they stop with the command that started them:
- `temporary_prefect_api()` for a one-off run (`nurture run cycle`, `demo`): the
  same server Prefect would start, on a free loopback port;
- `own_prefect_server()` for `nurture serve`: a real `prefect server start`,
  scheduler and UI included.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from nurture.errors import ConfigurationError


@contextmanager
def temporary_prefect_api() -> Iterator[str]:
    """The configured Prefect API, or a temporary server for this command only; yields the API URL."""
    import prefect
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    settings = get_current_settings()
    if settings.api.url:
        yield settings.api.url
        return
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        **settings.to_environment_variables(exclude_unset=True),
        # What Prefect sets for its own temporary server: no UI, ephemeral services only.
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(prefect.__file__).parent.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # noqa: S603
    try:
        _wait_until_healthy(
            api, process, timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), log_path=None
        )
        os.environ["PREFECT_API_URL"] = api  # the command's own child processes, if any
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield api
    finally:
        _drain_prefect_clients()
        os.environ.pop("PREFECT_API_URL", None)
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def own_prefect_server(*, port: int, log_path: Path, timeout: float = 120.0) -> Iterator[str]:
    """`prefect server start` on loopback, with its scheduler, for as long as `nurture serve` runs; yields its API URL.

    Port 0 picks a free one. The server keeps its runs in Prefect's home database
    (PREFECT_HOME), so the UI shows the history across restarts.
    """
    port = port or _free_port()
    if _port_taken(port):
        raise ConfigurationError(
            f"Port {port} is already in use. If a Prefect server runs there, point nurture at it with "
            f"PREFECT_API_URL=http://127.0.0.1:{port}/api; otherwise choose another port with --prefect-port."
        )
    api = f"http://127.0.0.1:{port}/api"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    prefect = str(Path(sys.executable).parent / "prefect")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with log_path.open("ab") as server_log:
        process = subprocess.Popen(  # noqa: S603 - our own Prefect executable, fixed arguments
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            _wait_until_healthy(api, process, timeout=timeout, log_path=log_path)
            yield api
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _drain_prefect_clients() -> None:
    """Send the logs and events still queued for the API before the server stops (it is their only reader)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


def _die_with_parent() -> None:
    """In the server's process: ask Linux to stop it if `nurture serve` is killed, so the port is freed."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_until_healthy(api: str, process: subprocess.Popen[bytes], *, timeout: float, log_path: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:] if log_path else "(its output is above)"
            raise ConfigurationError(f"The Prefect server exited with {process.returncode} (log {log_path}):\n{tail}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise ConfigurationError(
        f"The Prefect server did not answer within {timeout:.0f} s"
        + (f" (log {log_path})" if log_path else ": raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    )
