"""What other threads ask the network thread to send: generation-stamped acks and publishes.

paho is not thread-safe, so the dispatcher (acks of a committed batch) and the daemon's main
thread (the canary) never touch the client: they queue here and poke the ``Waker``, and the
network thread, which otherwise sleeps in select() until the socket or a timer needs it, wakes
at once and sends them (``Outbox.drain``). Each ack carries the generation of the connection that
delivered its message and goes out only on that connection: after a reconnect packet ids may
restart, and a stale ack would acknowledge a different, unprocessed message. A dropped ack means
a duplicate later, never a loss.
"""
from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable

import paho.mqtt.client as paho

from mqttd.daemon.metrics import LatencyWindow
from mqttd.message import Message
from mqttd.mqtt import pahofast


class Waker:
    """A socketpair the network thread selects on: ``poke()`` (any thread) makes it readable,
    ``clear()`` (network thread) empties it. Level-triggered, so a poke made between the
    network thread's last look at its queues and its select() is never lost."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def poke(self) -> None:
        try:
            self._w.send(b"\0")
        except (BlockingIOError, OSError):
            pass                  # full (a wake is pending anyway) or closed (stopping)

    def clear(self) -> None:
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


PublishNow = Callable[[paho.Client, str, "bytes | str", int, bool], object]


class Outbox:
    def __init__(self, waker: Waker) -> None:
        self._queue: deque[tuple] = deque()
        self.waker = waker
        self.ack_latencies = LatencyWindow(maxlen=1000)   # seconds, oldest message of each batch; histogram

    def ack(self, messages: list[Message]) -> None:
        """Queue the acks of a committed batch, in the order given: PUBACK for QoS 1, PUBREC for
        QoS 2. The oldest message's receipt time feeds ``ack_latencies`` (receipt -> PUBACK
        written). Pokes the network thread even for a batch of QoS 0 messages only: the batch
        left the intake, so a thread that stopped reading at max_backlog may read again."""
        items = [(m.generation, m.mid, m.qos) for m in messages if m.qos]
        if items:
            self._queue.append(("ack", items, messages[0].received_at))
        self.waker.poke()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        self._queue.append(("pub", topic, payload, qos, retain))
        self.waker.poke()

    def drain(self, client: paho.Client, generation: int, connected: bool, direct: bool, publish_now: PublishNow) -> None:
        """Send everything queued (network thread): acks only of the current connection's
        messages, publishes only while connected; the rest is dropped."""
        out = self._queue
        while out:
            item = out.popleft()
            if item[0] == "ack":
                if not connected:
                    continue          # the delivering connection is gone: duplicates, not loss
                acks = [(mid, qos) for g, mid, qos in item[1] if g == generation]
                if direct:
                    pahofast.ack_many(client, acks)
                else:                 # paho's QoS 2 flow: PUBREC went out already, PUBCOMP now
                    for mid, qos in acks:
                        client.ack(mid, qos)
                if item[2]:
                    self.ack_latencies.append(time.time() - item[2])
            else:
                _, topic, payload, qos, retain = item
                if connected:
                    publish_now(client, topic, payload, qos, retain)
