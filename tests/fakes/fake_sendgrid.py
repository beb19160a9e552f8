"""A loopback fake of SendGrid's v3 Mail Send endpoint, for tests of the real ``sendgrid`` client.

It answers like SendGrid (202 with ``X-Message-Id``, 400 with SendGrid's error
body, 401 without a bearer key), validates every body against the official
request schema, records what it accepted, and injects faults on demand.

It serves HTTP/1.1 with keep-alive, a thread per connection, and can answer
after a round trip's ``latency_seconds``; it counts the connections opened and
the most requests it held at once, so a test can see connections reused and
the concurrency reached.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA = json.loads((Path(__file__).parent / "sendgrid-mail-send.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default 5 drops connections under a few parallel clients

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is a scenario under test, not a server bug.
        return


@dataclass(frozen=True)
class Fault:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]
    delay_seconds: float = 0.0
    hang_up: bool = False


class FakeSendGrid:
    """Start with ``with FakeSendGrid() as fake:``; point the client at ``fake.url``."""

    def __init__(self, api_key: str = "SG.test-key", *, latency_seconds: float = 0.0) -> None:
        self.api_key = api_key
        self.latency_seconds = latency_seconds  # every answer waits this long, like a real round trip
        self.requested: list[str] = []  # the nurture message id of every request that reached the fake
        self.accepted: list[dict[str, Any]] = []
        self.accepted_at: list[float] = []  # time.monotonic() of each accepted request
        self.rejected: list[tuple[int, dict[str, Any] | None]] = []
        self.schema_errors: list[str] = []
        self.connections = 0  # connections that carried a mail send (the fake's own GETs not counted)
        self.requests = 0  # POSTs to the mail send endpoint
        self.in_flight = 0
        self.max_in_flight = 0  # the most POSTs being answered at once
        self.last_headers: dict[str, str] = {}  # the headers of the latest POST, names in lower case
        self._faults: deque[Fault] = deque()
        self._failure_rate = 0.0
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def message_ids(self) -> list[str]:
        """The nurture message id of every accepted request, in arrival order."""
        return [body.get("custom_args", {}).get("nurture_message_id", "") for body in self.accepted]

    def fail_next(self, status: int, *, headers: dict[str, str] | None = None, message: str = "injected") -> None:
        self._faults.append(Fault(status, headers or {}, {"errors": [{"message": message, "field": None}]}))

    def fail_randomly(self, rate: float, *, seed: int = 1) -> None:
        """Answer ``rate`` of requests with a 500, 503 or a 429 that resets within a second."""
        self._failure_rate = rate
        self._rng = random.Random(seed)

    def drop_next(self) -> None:
        """Read the next request, then close the connection without answering."""
        self._faults.append(Fault(0, {}, {}))

    def _random_fault(self) -> Fault | None:
        if self._failure_rate <= 0 or self._rng.random() >= self._failure_rate:
            return None
        status = self._rng.choice([500, 503, 429])
        headers = {"X-RateLimit-Reset": str(int(time.time()) + 1)} if status == 429 else {}
        return Fault(status, headers, {"errors": [{"message": "injected", "field": None}]})

    def hang_up_after_next(self) -> None:
        """Answer the next request, then close its connection (as a server does with an idle keep-alive one)."""
        self._faults.append(Fault(202, {}, {}, hang_up=True))

    def accept_slowly_next(self, seconds: float) -> None:
        """Accept the next request, but answer only after ``seconds`` (past the client's timeout)."""
        self._faults.append(Fault(202, {}, {}, delay_seconds=seconds))

    def __enter__(self) -> FakeSendGrid:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            # Small answers written at once: without this, Nagle's algorithm holds them back.
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                return

            posted = False  # this connection has carried a POST (one handler serves one connection)
            answered = True  # the current POST has been answered (or there is none)

            def do_POST(self) -> None:
                with fake._lock:
                    if not self.posted:
                        self.posted = True
                        fake.connections += 1
                    fake.requests += 1
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.last_headers = {name.lower(): value for name, value in self.headers.items()}
                self.answered = False
                try:
                    self._post()
                finally:
                    self._answered()

            def _answered(self) -> None:
                # Before the answer is written: the client may send its next request as soon as it reads it.
                if not self.answered:
                    self.answered = True
                    with fake._lock:
                        fake.in_flight -= 1

            def _answer(self, status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self._answered()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/_log":
                    with fake._lock:
                        log = {"requested": list(fake.requested), "accepted": fake.message_ids()}
                    self._answer(200, log)
                    return
                if self.path == "/_reset_counts":  # a benchmark measures each run on its own
                    with fake._lock:
                        fake.connections = fake.requests = fake.max_in_flight = 0
                    self._answer(200, {})
                    return
                if self.path != "/_stats":
                    self._answer(404, {"errors": [{"message": "not found"}]})
                    return
                with fake._lock:
                    stats = {
                        "accepted": len(fake.accepted),
                        "schema_errors": fake.schema_errors[:5],
                        "rejected": len(fake.rejected),
                        "connections": fake.connections,
                        "requests": fake.requests,
                        "max_in_flight": fake.max_in_flight,
                    }
                self._answer(200, stats)

            def _post(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v3/mail/send":
                    self._answer(404, {"errors": [{"message": "not found"}]})
                    return
                if self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._answer(401, {"errors": [{"message": "The provided authorization grant is invalid"}]})
                    return
                with fake._lock:
                    fake.requested.append(_message_id(raw))
                if fake.latency_seconds:
                    time.sleep(fake.latency_seconds)
                with fake._lock:
                    fault = fake._faults.popleft() if fake._faults else fake._random_fault()
                if fault is not None and fault.status == 0:
                    with fake._lock:
                        fake.accepted.append(json.loads(raw))
                        fake.accepted_at.append(time.monotonic())
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None and fault.hang_up:
                    fault = None
                    self.close_connection = True
                if fault is not None and fault.delay_seconds:
                    with fake._lock:
                        fake.accepted.append(json.loads(raw))
                        fake.accepted_at.append(time.monotonic())
                    time.sleep(fault.delay_seconds)
                    self._answer(202, None, {"X-Message-Id": uuid.uuid4().hex[:22]})
                    return
                if fault is not None:
                    with fake._lock:
                        fake.rejected.append((fault.status, None))
                    self._answer(fault.status, fault.body, fault.headers)
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._answer(400, {"errors": [{"message": "Bad Request", "field": None}]})
                    return
                problems = sorted(VALIDATOR.iter_errors(body), key=lambda e: list(e.path))
                if problems:
                    first = problems[0]
                    field = ".".join(str(p) for p in first.path) or None
                    with fake._lock:
                        fake.schema_errors.extend(p.message for p in problems)
                        fake.rejected.append((400, body))
                    self._answer(400, {"errors": [{"message": first.message, "field": field}]})
                    return
                with fake._lock:
                    fake.accepted.append(body)
                    fake.accepted_at.append(time.monotonic())
                self._answer(202, None, {"X-Message-Id": uuid.uuid4().hex[:22]})

        return Handler


def _message_id(raw: bytes) -> str:
    try:
        return str(json.loads(raw).get("custom_args", {}).get("nurture_message_id", ""))
    except (ValueError, AttributeError):
        return ""


def main() -> None:
    """Serve a fake in its own process (benchmarks, suites): prints its URL, serves until killed.

    ``python -m tests.fakes.fake_sendgrid [API_KEY] [--latency S] [--failure-rate R] [--seed N]``;
    ``GET /_log`` lists the message ids requested and accepted, ``GET /_stats`` counts requests,
    connections and the most requests in flight, ``GET /_reset_counts`` zeroes those counts.
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("api_key", nargs="?", default="SG.test-key")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    fake = FakeSendGrid(api_key=args.api_key, latency_seconds=args.latency)
    if args.failure_rate:
        fake.fail_randomly(args.failure_rate, seed=args.seed)
    with fake:
        print(fake.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
