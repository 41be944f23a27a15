"""The publisher's pipeline: our backlog, the in-flight window, and the confirms it settles.

A message waits in our own backlog (FIFO) until the connection is up and the in-flight window has
room, then goes to paho, which writes it at once (paho's own in-flight limit is switched off:
ours governs). Each PUBACK settles its ``Confirm`` and moves the next message on.

Why our own backlog rather than paho's queue: paho rescans its whole queue on every PUBACK
(``_update_inflight``), which is quadratic for a 10,000-message ``publish_many``; paho also ignores
the broker's Receive Maximum, and a message never handed to paho can still be withdrawn when its
caller gives up (``cancel``), so a retry cannot duplicate it.

A mixin of ``outbound.Outbound``, as ``OwnWrites`` is: the connection (the client, its callbacks,
its locks: see ``outbound`` for the lock order) is set up there and this module only moves
messages over it; it imports nothing of ``outbound``.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from mqttd.config import BrokerConfig
from mqttd.errors import PublishError
from mqttd.mqtt.confirm import Confirm
from mqttd.mqtt.ownwrites import OwnWrites
from mqttd.mqtt.stamp import Stamp

_EARLY = object()


class Pipeline(OwnWrites):
    """``submit``/``submit_many``/``cancel`` (callers), ``_pump``/``_move`` (whoever holds the pump
    lock), ``_settle`` (both). The attributes are set by ``Outbound.__init__``."""

    # (the client, v5, pub_id, own_writes, the lock, the backlog, pending and counters: OwnWrites)
    broker: BrokerConfig
    max_queued: int
    limit: int
    connected: threading.Event
    closing: bool
    last_error: str | None              # the connection's, for ``Confirm.why_not``
    _pump_lock: threading.Lock
    _pump_wanted: bool
    _early: dict[int, Any]

    @property
    def where(self) -> str:
        """The broker's address, for messages (the pipeline's errors and the connection's logs)."""
        return f"{self.broker.host}:{self.broker.port}"


    # ---- the pipeline ----------------------------------------------------------------------------
    def submit(self, confirm: Confirm, *, block: float | None = None, defer: bool = False) -> None:
        """Queue one message. When ``max_queued`` are already unconfirmed: wait up to ``block``
        seconds for room (None: do not wait), then raise PublishError. ``defer``: the caller
        does not wait for this message now (``publish(wait=False)``), see below."""
        confirm._conn = self
        with self._lock:
            full = len(self._backlog) + len(self._pending) >= self.max_queued
            if not full:
                self._backlog.append(confirm)
            # ``defer`` with own writes and messages in flight: the network thread moves this one
            # with the next burst of PUBACKs (it looks at the backlog after taking them, under this
            # lock), in one buffer with the others; moving it here meant a send() and a wake-up
            # per message (measured: publish(wait=False) 91 µs of CPU per message, publish_many
            # 18). Not for a caller about to wait: it would wait for that burst too (8 threads
            # of publish() fell from ~2,600 to 573 msg/s, measured).
            later = defer and not full and self.own_writes and self._in_flight > 0
        if full:
            self._wait_for_room(confirm, block)
        if not later:
            self._pump()

    def submit_many(self, confirms: list[Confirm], *, block: float | None = None) -> int:
        """``submit`` for many, in order: those that fit under ``max_queued`` queued under one
        lock and one pump, the rest one by one (each may wait ``block`` seconds for room, then
        raise PublishError). Returns how many were queued before an error (all, if none)."""
        for confirm in confirms:
            confirm._conn = self
        with self._lock:
            room = max(self.max_queued - len(self._backlog) - len(self._pending), 0)
            self._backlog.extend(confirms[:room])
        self._pump()
        for done, confirm in enumerate(confirms[room:], start=room):
            try:
                self.submit(confirm, block=block)
            except PublishError:
                return done
        return len(confirms)

    def _wait_for_room(self, confirm: Confirm, block: float | None) -> None:
        # A producer far ahead of the broker (publish_many of more than max_queued): wait until a
        # quarter of the queue is confirmed, not for each message (a thread switch per message).
        seen, deadline = -1, 0.0
        while True:
            with self._lock:
                if len(self._backlog) + len(self._pending) < self.max_queued:
                    self._backlog.append(confirm)
                    return
                k = min(self.max_queued // 4, len(self._backlog) - 1)
                mark = self._backlog[k] if k >= 0 else next(iter(self._pending.values()))
                progress = self.settled_count
            now = time.monotonic()
            if progress != seen:            # something was confirmed: the timeout starts again
                seen, deadline = progress, now + (block or 0.0)
            if now >= deadline:
                raise PublishError(f"publish to {confirm.topic!r} failed: {self.max_queued} messages already "
                                   f"wait for {self.where} ({mark.why_not(None)})")
            mark.settled(min(deadline - now, 0.1))

    def cancel(self, confirm: Confirm, why: str) -> bool:
        """Withdraw a message that is still in the backlog (never sent); False if it was sent."""
        with self._lock:
            try:
                self._backlog.remove(confirm)
            except ValueError:
                return False
            confirm._finish(why)
        return True

    def cancel_all(self, confirms: list[Confirm], why: str) -> int:
        """``cancel`` for many at once (one pass over the backlog); returns how many were withdrawn."""
        ids = {id(c) for c in confirms}
        with self._lock:
            gone = [c for c in self._backlog if id(c) in ids]
            if gone:
                self._backlog = deque(c for c in self._backlog if id(c) not in ids)
            for confirm in gone:
                confirm._finish(why)
        return len(gone)

    def _pump(self) -> None:
        """Move messages from the backlog to paho while the window has room. Whoever holds the pump
        lock moves for everyone: a caller that finds it taken leaves a note and returns at once
        (the network thread must never wait for a caller that is itself waiting for paho)."""
        self._pump_wanted = True
        while self._pump_wanted:
            if not self._pump_lock.acquire(blocking=False):
                return
            try:
                self._pump_wanted = False
                self._move()
            finally:
                self._pump_lock.release()

    def _move(self) -> None:
        client = self.client
        while self.connected.is_set() and not self.closing:
            batch: list[Confirm] = []
            with self._lock:
                if not self._backlog:
                    return
                confirm = self._backlog[0]
                if confirm.qos > 0:
                    room = self.limit - self._in_flight
                    if room <= 0:
                        return
                    if confirm.qos == 1 and self.own_writes:
                        backlog = self._backlog
                        while backlog and len(batch) < room and backlog[0].qos == 1:
                            batch.append(backlog.popleft())
                        self._in_flight += len(batch)
                    else:
                        self._in_flight += 1
                if not batch:
                    self._backlog.popleft()
            if batch:
                self._write_own(batch)
                continue
            props = None
            if self.v5 and confirm.qos > 0:
                self._seq += 1                  # only here, under the pump lock: wire order
                confirm.seq = self._seq
                props = Stamp.of(self.pub_id, self._seq)
            try:
                info = client.publish(confirm.topic, confirm.payload, qos=confirm.qos, retain=confirm.retain,
                                      properties=props)
            except Exception as exc:  # noqa: BLE001 - paho validates what we already validated
                self._settle(confirm, f"paho refused it: {exc}")
                continue
            rc = info.rc
            if rc == MQTTErrorCode.MQTT_ERR_NO_CONN and confirm.qos > 0:
                rc = MQTTErrorCode.MQTT_ERR_SUCCESS  # the connection dropped just now: paho resends it
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._settle(confirm, f"not sent: {paho.error_string(rc)}")
                continue
            with self._lock:
                confirm.mid = info.mid
                reason = self._early.pop(info.mid, _EARLY)
                if reason is _EARLY:
                    self._pending[info.mid] = confirm
            if reason is not _EARLY:
                self._settle(confirm, refusal(reason))

    def _settle(self, confirm: Confirm, error: str | None) -> None:
        with self._lock:
            if confirm.qos > 0:
                self._in_flight -= 1
            self.settled_count += 1
            confirm._finish(error)


def refusal(reason: Any) -> str | None:
    """None for a success; the broker's words for a PUBACK/PUBCOMP reason code >= 0x80 (MQTT 5)."""
    if reason is not None and getattr(reason, "is_failure", False):
        return f"the broker refused it: {reason}"
    return None
