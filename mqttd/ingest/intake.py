"""The hand-off from the network thread to the dispatcher: a deque that never blocks the
network thread and never drops. Bounded by the network thread itself, which stops reading the
socket while ``len()`` is past ``dispatch.max_backlog``."""
from __future__ import annotations

import threading
import time
from collections import deque

from mqttd.message import Message


class Intake:
    """Network thread -> dispatcher hand-off. ``put`` never blocks and never drops: the network
    thread stops reading the socket instead when ``len()`` passes the high-water mark."""

    def __init__(self) -> None:
        self._q: deque[Message] = deque()
        self._ready = threading.Event()

    def put(self, msg: Message) -> None:
        self._q.append(msg)
        if not self._ready.is_set():
            self._ready.set()

    def __len__(self) -> int:
        return len(self._q)

    def wake(self) -> None:
        """Make a waiting ``take`` look at its stop event now."""
        self._ready.set()

    def take(self, size: int, linger: float, stop: threading.Event) -> list[Message]:
        """Up to ``size`` messages: waits for the first, then at most ``linger`` s to fill."""
        q, ready = self._q, self._ready
        while not q:
            ready.clear()
            if q:
                break
            if stop.is_set():
                return []
            ready.wait(10.0)    # put() and stop() wake it (wake): the timeout is only a safety net
        batch: list[Message] = []
        deadline = time.monotonic() + linger
        while True:
            while q and len(batch) < size:
                batch.append(q.popleft())
            if len(batch) >= size:
                return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.is_set():
                return batch
            ready.clear()
            if not q:
                ready.wait(remaining)
