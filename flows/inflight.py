"""Requests in flight: sending threads fed in waves, whose outcomes come back as each one finishes.

The send loop (``flows/sending.py``) keeps up to ``concurrency`` sends in
flight: it hands a wave over with :meth:`InFlight.launch` and takes the
outcomes that have come back with :meth:`InFlight.finished`, so a slow send
(a retry, a 429 wait) holds up its own slot only, not a whole group.

No database and no Prefect here: only threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Generic, TypeVar

from nurture.delivery import SendOutcome

Item = TypeVar("Item")


class InFlight(Generic[Item]):
    """Up to ``concurrency`` sends at once, each in a thread of its own (which keeps its connection alive)."""

    def __init__(self, send: Callable[[Item], SendOutcome], *, concurrency: int) -> None:
        self.concurrency = max(concurrency, 1)
        self._send = send
        # Plain threads on two queues: a Future (and its Condition) per send costs more than the send's own work.
        self._inbox: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[Item, SendOutcome | BaseException]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.count = 0  # launched, outcome not yet taken

    @property
    def free(self) -> int:
        return self.concurrency - self.count

    def launch(self, items: Iterable[Item]) -> None:
        for item in items:
            self._inbox.put(item)
            self.count += 1
        # A thread per slot in use, started as needed (each keeps its own connection).
        while len(self._threads) < min(self.count, self.concurrency):
            thread = threading.Thread(target=self._work, name=f"nurture-send-{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while (item := self._inbox.get()) is not None:
            try:
                outcome: SendOutcome | BaseException = self._send(item)
            except BaseException as exc:  # handed to the loop, which records what is known, then raises it
                outcome = exc
            self._done.put((item, outcome))

    def finished(self, *, at_least: int) -> tuple[list[tuple[Item, SendOutcome]], BaseException | None]:
        """Wait until ``at_least`` sends have finished (or one failed unexpectedly); take every finished one.

        Returns the outcomes, and the first unexpected error among them (the loop stops at it).
        """
        taken: list[tuple[Item, SendOutcome]] = []
        error: BaseException | None = None
        wanted = min(at_least, self.count)
        while self.count:
            try:
                item, outcome = self._done.get(block=len(taken) < wanted and error is None)
            except queue.Empty:
                break
            self.count -= 1
            if isinstance(outcome, BaseException):
                error = error or outcome
            else:
                taken.append((item, outcome))
        return taken, error

    def __enter__(self) -> InFlight[Item]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        # On an error the sends already launched still go (they are marked `sending`, so they leave as
        # promised), unrecorded: their messages become `in_doubt` when the lease runs out.
        for _ in self._threads:
            self._inbox.put(None)
        for thread in self._threads:
            thread.join()
