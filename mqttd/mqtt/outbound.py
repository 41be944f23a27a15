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
import time
from collections import deque
from typing import Any

import paho.mqtt.client as paho

from mqttd.config import BrokerConfig
from mqttd.mqtt import outfast, pahofast
from mqttd.mqtt.client import UNSUPPORTED_PROTOCOL, new_client
from mqttd.mqtt.confirm import Confirm
from mqttd.mqtt.negotiate import (
    BACK_TO_5,
    CONFIRM_311,
    EARLY_CLOSE_S,
    REFUSED,
    TRY_311,
    publisher_negotiation,
    remember_publisher_protocol,
)
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
        # "auto": MQTT 5 first, so that the messages carry the gap-detection stamp; 3.1.1 if this
        # connection's own CONNECT is refused for it (no probe: one connection per process, §5.4)
        self.negotiation = publisher_negotiation(broker)
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
        self._attempt_at = 0.0                     # monotonic: the current connect attempt began
        self._connack_seen = False                 # ... and got a CONNACK (either answer)
        self._switch = False                       # rebuild for the other protocol once closed
        self._refusal_said = False                 # an explicit "5" refused: logged once
        self._switches = 0                         # clients given up so far (each next one waits longer)
        self._switch_lock = threading.Lock()       # a switch and close() never interleave
        self._closed = threading.Event()           # set by close(): ends a switch's wait
        self._build()

    def _build(self) -> None:
        """A paho client speaking the negotiated protocol, with our hooks, connecting in the
        background. Rebuilt (same client id) only when "auto" learns that the broker refuses 5:
        nothing has been sent then, the messages wait in our backlog."""
        broker, self.protocol = self.broker, self.negotiation.protocol
        self.v5 = self.protocol == "5"
        c = new_client(broker, self.client_id, persistent=False, protocol=self.protocol)
        c.reconnect_delay_set(broker.reconnect_min, broker.reconnect_max)  # type: ignore[arg-type]
        c.max_inflight_messages_set(0)      # 0 = paho sends at once and never rescans: our window governs
        c.suppress_exceptions = True        # a callback bug must not kill the network thread (§4)
        # No on_log: paho formats a debug line per packet for it; our callbacks log their own errors.
        c.on_connect, c.on_disconnect, c.on_connect_fail = self._on_connect, self._on_disconnect, self._on_fail
        c.on_pre_connect = self._on_pre_connect
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

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        self._attempt_at, self._connack_seen = time.monotonic(), False

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if client is not self.client or self.closing:
            return                          # a client given up for another protocol, or closed
        self._connack_seen = True
        try:
            if rc.is_failure:
                self.last_error = f"broker refused the connection: {rc}"
                if not self._negotiate(unsupported=self.v5 and rc.value in UNSUPPORTED_PROTOCOL):
                    log.error("publisher %s: %s", self.client_id, self.last_error)
                return
            if self.negotiation.connected():
                log.info("publisher %s: the broker at %s refused MQTT 5 (%s): publishing over MQTT 3.1.1 for the "
                         'life of this process, without the gap-detection stamp (protocol = "auto")',
                         self.client_id, self.where, self.negotiation.reason)
            if self.negotiation.configured == "auto":
                remember_publisher_protocol(self.broker, self.protocol)
            receive_max = getattr(props, "ReceiveMaximum", None) if self.v5 else None
            self.limit = min(self.window, receive_max or self.window)
            self.connects += 1
            self.last_error = None
            if self.own_writes:
                self._resend_own()          # ours in flight on the lost connection: first again
            self.connected.set()
            log.info("publisher %s connected to %s (MQTT %s)", self.client_id, self.where, self.protocol)
            self._pump()
        except Exception:  # noqa: BLE001
            log.exception("publisher %s: on_connect failed", self.client_id)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if client is not self.client:
            return
        was = self.connected.is_set()
        self.connected.clear()
        # A QoS 0 message not written yet is dropped with the connection (paho empties its packet
        # queue on reconnect and resends only QoS 1/2): its confirm would never come.
        with self._lock:
            lost = [mid for mid, c in self._pending.items() if c.qos == 0]
            for mid in lost:
                self._pending.pop(mid)._finish("connection lost before it was written (QoS 0 is not resent)")
        if self.closing:
            return
        if was:
            self.last_error = f"disconnected: {rc}"
            log.warning("publisher %s lost its connection to %s: %s (reconnecting)", self.client_id, self.where, rc)
        elif not self._connack_seen and self._attempt_at:
            # Closed before any CONNACK: how RabbitMQ before 3.13 refuses MQTT 5 (or a restart).
            self.last_error = f"the broker at {self.where} closed the connection before any CONNACK"
            self._negotiate(closed_early=time.monotonic() - self._attempt_at < EARLY_CLOSE_S)
        self._switch_if_asked(client)

    def _switch_if_asked(self, client: paho.Client) -> None:
        """Give ``client`` up for one speaking the other protocol, same client id, if the
        negotiation asked for it. Called from the client's own network thread once its socket is
        closed (the broker never sees the two at once); paho's loop ends after this callback.
        Nothing was sent: the messages wait in our backlog."""
        if not self._switch or self.closing:
            return
        self._switch = False
        client.on_connect = client.on_disconnect = client.on_pre_connect = client.on_connect_fail = None
        client.disconnect()
        # From the client's own thread loop_stop() only marks the thread to end, which is needed:
        # after a close before any CONNACK paho sets the state to "connection lost" once this
        # callback returns, and would reconnect this client under the same id for ever.
        client.loop_stop()
        # Each new paho client starts its backoff afresh: wait here as a reconnect would, so that a
        # listener closing every connection gets no storm of clients (the first switch, a refusal
        # of 5 in a CONNACK, goes at once). This thread stays alive meanwhile (``alive()``).
        b = self.broker
        delay = 0.0 if not self._switches else min(b.reconnect_max, b.reconnect_min * 2 ** (self._switches - 1))
        self._switches += 1
        if delay and self._closed.wait(delay):
            return
        with self._switch_lock:
            if not self.closing:
                self._build()

    def _negotiate(self, *, unsupported: bool = False, closed_early: bool = False) -> bool:
        """A connect attempt failed before a successful CONNACK: what the negotiation makes of it.
        True if it changed course: the client is to be rebuilt for the other protocol when its
        connection has closed (``_switch``), or the failure is a configuration error (``last_error``)."""
        neg = self.negotiation
        action = neg.failed(unsupported=unsupported, closed_early=closed_early, ever_connected=self.connects > 0)
        if action in (TRY_311, BACK_TO_5):
            self._switch = True
            return True
        if action in (REFUSED, CONFIRM_311):
            self.last_error = str(neg.refusal(self.broker))     # what a failing publish says
            if not self._refusal_said:          # once, not once per reconnect attempt
                self._refusal_said = True
                log.error("publisher %s: %s", self.client_id, self.last_error)
            return True
        return False

    def _on_fail(self, client: paho.Client, userdata: Any) -> None:
        if client is not self.client:
            return
        self.last_error = f"cannot connect to {self.where}"
        # Nothing listening: no word on MQTT 5 either way. A 3.1.1 attempt that "auto" was trying
        # goes back to 5 (as in the daemon's session), so a restart is never taken for a refusal.
        self._negotiate()
        self._switch_if_asked(client)

    # ---- ending ------------------------------------------------------------------------------------
    def close(self, timeout: float = 2.0) -> None:
        """Orderly DISCONNECT; only ever called in the process that owns the connection. Messages
        not confirmed by then fail with "publisher closed"."""
        with self._switch_lock:             # no client is being built for a switch meanwhile
            self.closing = True
            self._closed.set()
            client, thread = self.client, self.thread
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001 - closing: nothing left to report to
            pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
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
