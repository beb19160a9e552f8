"""`nurture api` as it runs: a real uvicorn process on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.engine import get_engine, upgrade_schema
from tests.conftest import PLAYBOOK_PATH, TEMPLATES_DIR

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
def api_port(tmp_path: Path) -> Iterator[int]:
    url = f"sqlite:///{tmp_path / 'nurture.db'}"
    upgrade_schema(get_engine(url))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    env = {
        **os.environ,
        "NURTURE_DATABASE_URL": url,
        "NURTURE_PLAYBOOK": str(PLAYBOOK_PATH),
        "NURTURE_TEMPLATES": str(TEMPLATES_DIR),
    }
    nurture = str(Path(sys.executable).parent / "nurture")
    with (tmp_path / "api.log").open("wb") as log:
        server = subprocess.Popen([nurture, "api", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(600):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert server.poll() is None, (tmp_path / "api.log").read_text()
                    time.sleep(0.1)
            yield port
        finally:
            server.terminate()
            server.wait(timeout=30)


def _answer(connection: socket.socket) -> bytes:
    connection.sendall(HEALTHZ)
    received = b""
    while b'"ok"}' not in received:
        chunk = connection.recv(4096)
        assert chunk, f"the server closed the connection instead of answering: {received!r}"
        received += chunk
    return received


def test_an_idle_connection_stays_open_longer_than_clients_and_proxies_keep_it(api_port: int) -> None:
    """Clients and reverse proxies reuse an idle connection for some seconds (httpx 5, nginx and AWS's
    load balancers 60); a server that closes it first resets the request sent as it closes."""
    with socket.create_connection(("127.0.0.1", api_port), timeout=10) as connection:
        assert _answer(connection).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        connection.setblocking(False)
        try:
            closed = connection.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            closed = False
        connection.setblocking(True)
        assert not closed, "the server closed an idle connection after less than 6 s"
        assert _answer(connection).startswith(b"HTTP/1.1 200")
