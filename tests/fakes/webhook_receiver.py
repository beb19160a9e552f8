"""A webhook receiver on loopback: a real threading HTTP server that records every request it gets.

What it answers is scripted (``answer(path, count)`` → status code, ``count`` being how
many requests that path had, this one included); it can take its time (``delay``) so a
test can kill a dispatcher while requests are in flight. It lives in the test's process,
so it outlives the dispatcher processes a test kills.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def delivery_id(self) -> str:
        return self.headers["nurture-delivery-id"]


class Receiver:
    def __init__(self, answer: Callable[[str, int], int] | None = None, delay: float = 0.0) -> None:
        self.answer = answer or (lambda _path, _count: 200)
        self.delay = delay
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._per_path: Counter[str] = Counter()
        self.url = ""

    def record(self, received: Received) -> int:
        with self._lock:
            self.requests.append(received)
            self._per_path[received.path] += 1
            count = self._per_path[received.path]
        if self.delay:
            time.sleep(self.delay)
        return self.answer(received.path, count)

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def ids(self) -> Counter[str]:
        with self._lock:
            return Counter(r.delivery_id for r in self.requests)


@contextmanager
def webhook_receiver(answer: Callable[[str, int], int] | None = None, delay: float = 0.0) -> Iterator[Receiver]:
    receiver = Receiver(answer, delay)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status = receiver.record(Received(self.path, headers, body))
            reply = b'{"ok": true}' if status < 300 else b'{"error": "scripted"}'
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the dispatcher was killed while waiting: it never learns the answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def documented_verifier() -> Callable[..., bool]:
    """``verify_nurture_signature`` exactly as docs/webhooks.md prints it (the block after its marker)."""
    text = DOCS.read_text()
    block = re.search(r"<!-- verification snippet -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert block is not None, "docs/webhooks.md lost its verification snippet"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), str(DOCS), "exec"), namespace)  # our own docs, on purpose
    verify = namespace["verify_nurture_signature"]
    assert callable(verify)
    return verify  # type: ignore[no-any-return]
