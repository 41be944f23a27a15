"""The publisher's connection: one paho client, its network thread, and a confirm pipeline.

``mqttd.publisher`` (the tenant's API) hands this module ``Confirm`` receipts
(``mqttd.mqtt.confirm``); nothing of paho goes past it. A message waits in our own backlog
(FIFO) until the connection is up and the in-flight window has room, then goes to paho, which
writes it at once (paho's own in-flight limit is switched off: ours governs). Each PUBACK frees
a slot and moves the next message on, so many messages are in flight per round trip, not one.
The backlog and the window are ``mqttd.mqtt.pipeline`` (a mixin, as ``ownwrites`` is); this
module owns the connection: the client, its network thread, its callbacks, and closing it.

Locks: the thread holding ``_pump_lock`` is the only one calling ``client.publish`` and may wait
there for paho's mutexes; the network thread, which holds those mutexes while paho calls
``on_publish``, only ever try-acquires ``_pump_lock`` (leaving a note for its holder when taken),
so the two never wait for each other. ``_lock`` is short and never held while calling paho.

QoS 1 messages do not go through ``client.publish`` when this paho has the internals we expect:
see ``mqttd.mqtt.ownwrites`` (the network thread moves the next ones once per burst of PUBACKs,
``_after_reads``).
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from collections import deque
from typing import Any

import paho.mqtt.client as paho

from mqttd.config import BrokerConfig
from mqttd.mqtt import outfast, pahofast
from mqttd.mqtt.client import new_client
from mqttd.mqtt.confirm import Confirm
from mqttd.mqtt.negotiate import publisher_protocol
from mqttd.mqtt.ownwrites import OWN_WRITES
from mqttd.mqtt.pipeline import Pipeline, refusal

log = logging.getLogger("mqttd.publisher")

# Messages in flight, at most: on MQTT 5 also never more than the broker's Receive Maximum (mosquitto:
# max_inflight_messages, default 20). MQTT 3.1.1 has no such cap (mosquitto limits only what it
# sends). 100 rather than paho's 20: publish_many over 3.1.1 went from ~15,000 to ~27,000 msg/s
# (2026-12-07, loaded 2-CPU machine): a window of 20 emptied within one round trip.
DEFAULT_WINDOW = 100
MAX_QUEUED = 10_000     # unconfirmed messages (backlog + in flight) before a publish fails fast


class Outbound(Pipeline):
    """One paho client and its network thread, owned by the process that created it."""

    def __init__(self, broker: BrokerConfig, client_id: str, *, window: int = DEFAULT_WINDOW,
                 max_queued: int = MAX_QUEUED) -> None:
        self.broker, self.client_id, self.pid = broker, client_id, os.getpid()
        # "auto": MQTT 5 where the broker has it (the gap-detection stamp), settled before connecting
        self.protocol = publisher_protocol(broker, client_id)
        self.v5 = self.protocol == "5"
        # ``mqttd-pub``: never reused, even when the OS reuses this PID (gap detection: docs/operations.md).
        self.pub_id = f"{client_id}-{secrets.token_hex(4)}"
        self.window, self.max_queued = window, max_queued
        self.limit = window                 # min(window, the broker's Receive Maximum), per connect
        self.connected = threading.Event()
        self.connects = 0
        self.last_error: str | None = None
        self.closing = False
        self._lock = threading.Lock()
        self._pump_lock = threading.Lock()
        self._pump_wanted = False
        self._backlog: deque[Confirm] = deque()
        self._pending: dict[int, Confirm] = {}     # mid -> Confirm, handed to paho
        self._early: dict[int, Any] = {}           # mid -> reason, confirmed before we registered it
        self._in_flight = 0                        # QoS > 0 in _pending
        self.settled_count = 0                     # messages done so far: progress, for publish_many
        self._seq = 0
        c = new_client(broker, client_id, persistent=False, protocol=self.protocol)
        c.reconnect_delay_set(broker.reconnect_min, broker.reconnect_max)  # type: ignore[arg-type]
        c.max_inflight_messages_set(0)      # 0 = paho sends at once and never rescans: our window governs
        c.suppress_exceptions = True        # a callback bug must not kill the network thread (§4)
        # No on_log: paho formats a debug line per packet for it; our callbacks log their own errors.
        c.on_connect, c.on_disconnect, c.on_connect_fail = self._on_connect, self._on_disconnect, self._on_fail
        c.on_publish = self._on_publish
        if self.v5:
            pahofast.apply()                # paho builds a Properties per PUBACK: share its tables
        self.own_writes = False             # set below once every hook is in place
        reads = outfast.fast_reads(c, after=self._after_reads, take=self._take_puback, v5=self.v5)
        outfast.fast_pubacks(c, self.v5, self._on_publish)
        self.own_writes = (reads and all(hasattr(c, name) for name in OWN_WRITES)
                           and outfast.own_pubacks(c, self.v5, self._take_puback))
        self.client = c                     # before loop_start: on_connect may run at once
        kwargs: dict[str, Any] = {"clean_start": True} if self.v5 else {}
        c.connect_async(broker.host, broker.port, broker.keepalive, **kwargs)
        c.loop_start()
        self.thread: threading.Thread | None = getattr(c, "_thread", None)

    def alive(self) -> bool:
        return self.thread is None or self.thread.is_alive()

    def queued(self) -> int:
        """Messages not confirmed yet: waiting in the backlog or in flight."""
        with self._lock:
            return len(self._backlog) + len(self._pending)

    # ---- paho callbacks (network thread) -----------------------------------------------------------
    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        try:
            with self._lock:
                confirm = self._pending.pop(mid, None)
                if confirm is None:
                    self._early[mid] = reason     # _move has not registered this mid yet
                    return
            self._settle(confirm, refusal(reason))
            self._pump_from_network_thread(client)
        except Exception:  # noqa: BLE001 - keep the network thread alive, say why
            log.exception("publisher %s: on_publish failed", self.client_id)

    def _after_reads(self) -> None:
        if self.own_writes and self._backlog:
            try:
                self._pump_from_network_thread(self.client)
            except Exception:  # noqa: BLE001 - keep the network thread alive, say why
                log.exception("publisher %s: moving messages failed", self.client_id)

    def _pump_from_network_thread(self, client: paho.Client) -> None:
        with outfast.no_wakeups(client):
            self._pump()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        try:
            if rc.is_failure:
                self.last_error = f"broker refused the connection: {rc}"
                log.error("publisher %s: %s", self.client_id, self.last_error)
                return
            receive_max = getattr(props, "ReceiveMaximum", None) if self.v5 else None
            self.limit = min(self.window, receive_max or self.window)
            self.connects += 1
            self.last_error = None
            if self.own_writes:
                self._resend_own()          # ours in flight on the lost connection: first again
            self.connected.set()
            log.info("publisher %s connected to %s", self.client_id, self.where)
            self._pump()
        except Exception:  # noqa: BLE001
            log.exception("publisher %s: on_connect failed", self.client_id)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        # A QoS 0 message not written yet is dropped with the connection (paho empties its packet
        # queue on reconnect and resends only QoS 1/2): its confirm would never come.
        with self._lock:
            lost = [mid for mid, c in self._pending.items() if c.qos == 0]
            for mid in lost:
                self._pending.pop(mid)._finish("connection lost before it was written (QoS 0 is not resent)")
        if not self.closing:
            self.last_error = f"disconnected: {rc}"
            if was:
                log.warning("publisher %s lost its connection to %s: %s (reconnecting)", self.client_id, self.where, rc)

    def _on_fail(self, client: paho.Client, userdata: Any) -> None:
        self.last_error = f"cannot connect to {self.where}"

    # ---- ending ------------------------------------------------------------------------------------
    def close(self, timeout: float = 2.0) -> None:
        """Orderly DISCONNECT; only ever called in the process that owns the connection. Messages
        not confirmed by then fail with "publisher closed"."""
        self.closing = True
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - closing: nothing left to report to
            pass
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        with self._lock:
            left = list(self._backlog) + list(self._pending.values())
            self._backlog.clear()
            self._pending.clear()
            for confirm in left:
                confirm._finish("publisher closed before the broker confirmed it")

    def abandon_inherited(self) -> None:
        """In a forked child: close this process's copies of the descriptors and nothing else."""
        for name in ("_sock", "_sockpairR", "_sockpairW"):
            sock = getattr(self.client, name, None)
            if sock is not None:
                try:
                    sock.close()          # close(), never shutdown(): no FIN, no DISCONNECT
                except OSError:
                    pass
                setattr(self.client, name, None)
        # Nothing else: the client's locks may have been held by the parent's threads at fork time.
