"""The daemon's MQTT session: a persistent session on a network thread of its own.

Design (see research/reliability-facts.md):
- One network thread of our own calls ``client.loop()``; it is the only thread that ever touches
  the paho client. Acks and publishes from other threads go through ``_outbox`` and are sent
  between loop calls, so acks and reconnects can never interleave (paho is not thread-safe).
- Every connection gets a generation number. Each delivery carries the generation of the
  connection that delivered it, and an ack is sent only if that connection is still the current
  one: after a reconnect packet ids may restart, and a stale ack would acknowledge a different,
  unprocessed message. Dropped acks mean duplicates later, never loss.
- Persistent session done right: clean_session=False on 3.1.1; clean_start=False on *every*
  connect plus an explicit SessionExpiryInterval on 5 (paho's defaults drop the session).
- Every PUBLISH reaches ``_on_publish``, which only appends to the intake; when the intake is
  over its high-water mark the thread stops reading the socket (reading one packet every
  keepalive/4, so the keepalive never lapses) instead of dropping.
- The socket is read 64 KiB at a time and PUBLISH packets are decoded from that buffer
  (``pahofast.RecvBuffer``); a buffer never outlives its connection.
- A callback exception is not swallowed: it ends the network thread and the daemon's watchdog
  exits non-zero, so Supervisor restarts a clean process.
"""
from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..config import BrokerConfig
from ..errors import BrokerAuthError, TakeoverDetected
from ..message import Message
from . import owner, pahofast
from .client import auth_refused, new_client

log = logging.getLogger("mqttd.session")

LOOP_TIMEOUT_S = 0.01   # bounds the delay of an ack queued by the dispatcher
DRAIN_PACKETS = 256     # packets handled from the receive buffer before acks go out again


@dataclass
class SessionState:
    """What the status file and the watchdog read. Written by the network thread only."""

    connected: bool = False
    generation: int = 0
    connects: int = 0
    reconnects: int = 0
    session_gaps: int = 0
    last_connected_at: float | None = None      # wall clock
    last_disconnected_at: float | None = None
    last_error: str | None = None
    loop_beat: float = 0.0                      # monotonic time of the last loop iteration
    subscribe_failures: tuple[str, ...] = ()
    paused_reading: bool = False


class Session:
    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        subscriptions: list[tuple[str, int]],
        deliver: Callable[[Message], None],
        backlog: Callable[[], int],
        max_backlog: int,
        status_topic: str,
        subscriptions_file: Path | None = None,
        receive_maximum: int = 1000,
        takeover_rounds: int = 0,
        owner_topic: str | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.subscriptions = subscriptions
        self._deliver = deliver
        self._backlog = backlog
        self._max_backlog = max_backlog
        self.status_topic = status_topic
        self._subs_file = subscriptions_file
        self._receive_maximum = receive_maximum
        self._takeover_rounds = takeover_rounds
        # Takeover evidence: our retained owner record on owner_topic, and someone else's
        # arriving after ours (a broker restart can never produce that; a twin always does).
        self._owner_topic = owner_topic
        self._owner_topic_b = owner_topic.encode() if owner_topic else None
        self._owner_payload = owner.own_record()
        self._started_at = owner.started_at(self._owner_payload)
        self._twin_is_older = False
        self.twin: str | None = None
        self._subscribe_mid: int | None = None
        self.v5 = broker.protocol == "5"
        self.state = SessionState()
        self.fatal: Exception | None = None          # set when the thread ends on an error we must report
        self._outbox: deque[tuple] = deque()
        self.ack_latencies: deque[float] = deque(maxlen=1000)   # seconds, oldest message of each batch
        self._stop = threading.Event()
        self._stop_reading = False
        self._connect_started = 0.0
        self._short_lived = 0
        self._had_session = bool(subscriptions_file and subscriptions_file.exists())
        self._client = self._make_client()
        self.thread = threading.Thread(target=self._run, name=f"mqttd-net-{client_id}", daemon=True)

    # ---- the client -------------------------------------------------------------------------
    def _make_client(self) -> paho.Client:
        if self.v5:
            pahofast.apply()
        # reconnect_on_failure=False: the loop in _run reconnects, with our backoff and generations.
        client = new_client(self.broker, self.client_id, persistent=True, manual_ack=True,
                            reconnect_on_failure=False)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        pahofast.skip_filtered_callbacks(client)     # we never use message_callback_add
        self._rbuf = pahofast.RecvBuffer(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        if not pahofast.direct_publish(client, self._on_publish):
            client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_properties(self) -> Properties | None:
        if not self.v5:
            return None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.broker.session_expiry
        props.ReceiveMaximum = self._receive_maximum
        return props

    # ---- API for other threads -----------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def ack(self, items: list[tuple[int, int]], oldest_received_at: float = 0.0) -> None:
        """Queue PUBACKs for (generation, mid) pairs; sent by the network thread.

        ``oldest_received_at`` (wall clock) feeds ``ack_latencies``: receipt -> PUBACK written."""
        self._outbox.append(("ack", items, oldest_received_at))

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        self._outbox.append(("pub", topic, payload, qos, retain))

    def stop_reading(self) -> None:
        """Stop taking messages (first step of a graceful stop); acks still go out."""
        self._stop_reading = True

    def stop(self, timeout: float = 5.0) -> None:
        """Flush queued acks, publish the retained offline status, disconnect, join."""
        self._stop.set()
        self.thread.join(timeout)

    def last_bytes_received(self) -> float | None:
        """Monotonic time of the last bytes from the broker (PINGRESP included), if known."""
        return getattr(self._client, "_last_bytes_received", None)

    # ---- the network thread ----------------------------------------------------------------------
    def _run(self) -> None:
        delay = self.broker.reconnect_min
        try:
            while not self._stop.is_set():
                self.state.loop_beat = time.monotonic()
                if not self.state.connected and not self._socket_open():
                    if self._try_connect():
                        delay = self.broker.reconnect_min
                    else:
                        self._backoff(delay)
                        delay = min(delay * 2, self.broker.reconnect_max)
                        continue
                if not self.state.connected and time.monotonic() - self._connect_started > max(10, self.broker.keepalive):
                    self._lost(MQTTErrorCode.MQTT_ERR_CONN_LOST)    # TCP up but no CONNACK: broker stuck
                    self.state.last_error = "no CONNACK from broker"
                    self._backoff(delay)
                    continue
                rc = self._step()
                self._drain_outbox()
                if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                    self._lost(rc)
                    if self.fatal is not None:
                        return
                    self._backoff(delay)
                    delay = min(delay * 2, self.broker.reconnect_max)
            self._shutdown()
        except BaseException as exc:  # noqa: BLE001 - reported by the watchdog, never swallowed
            self.fatal = exc
            log.critical("network thread died: %r", exc, exc_info=True)
            raise

    def _socket_open(self) -> bool:
        return self._client.socket() is not None

    def _try_connect(self) -> bool:
        b = self.broker
        self._connect_started = time.monotonic()
        try:
            if self.v5:
                self._client.connect(b.host, b.port, b.keepalive, clean_start=False,
                                     properties=self._connect_properties())
            else:
                self._client.connect(b.host, b.port, b.keepalive)
            return True
        except (OSError, ssl.SSLError, socket.gaierror, ValueError) as exc:
            reason = f"cannot connect to {b.host}:{b.port}: {exc}"
            if reason != self.state.last_error:
                log.warning("%s (retrying with backoff)", reason)
            self.state.last_error = reason
            return False

    def _step(self) -> MQTTErrorCode:
        """One loop iteration; stops reading while the intake is full or while stopping."""
        c = self._client
        if self._stop_reading or self._backlog() >= self._max_backlog:
            if not self.state.paused_reading:
                self.state.paused_reading = True
                self._paused_since = time.monotonic()
            # Never pause past a quarter of the keepalive: PINGRESPs must still be read.
            if time.monotonic() - self._paused_since < self.broker.keepalive / 4:
                rc = c.loop_write()
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    rc = c.loop_misc()
                time.sleep(LOOP_TIMEOUT_S)
                return rc
            self._paused_since = time.monotonic()
            return self._loop_once(at_least_one=True)
        self.state.paused_reading = False
        return self._loop_once()

    def _loop_once(self, at_least_one: bool = False) -> MQTTErrorCode:
        """``client.loop()``, then the packets already in the receive buffer (they do not wake
        select()), a bounded number at a time so that queued acks go out in between.

        ``at_least_one``: the read a paused session makes every keepalive/4 handles a buffered
        packet even though the intake is full. When everything the broker sent is already
        buffered, the socket is not readable and it would otherwise read nothing; paho, seeing
        no bytes after its PINGREQ, would then drop the connection ("Keep alive timeout")."""
        rbuf = self._rbuf
        pending = rbuf.pending()
        rc = self._client.loop(0.0 if pending else LOOP_TIMEOUT_S)
        n = 0
        if at_least_one and pending and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            rc = self._read_buffered()
            n = 1
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and n < DRAIN_PACKETS and rbuf.pending() \
                and self._backlog() < self._max_backlog:
            rc = self._read_buffered()
            n += 1
        return rc

    def _read_buffered(self) -> MQTTErrorCode:
        """One packet from the receive buffer: a whole QoS 0/1 PUBLISH decoded by the buffer
        itself, anything else by paho."""
        packet = self._rbuf.take_publish(self.v5)
        if packet is None:
            return self._client.loop_read()
        self._on_publish(*packet)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _drain_outbox(self) -> None:
        out = self._outbox
        c = self._client
        gen = self.state.generation
        connected = self.state.connected
        while out:
            item = out.popleft()
            if item[0] == "ack":
                if not connected:
                    continue          # the delivering connection is gone: duplicates, not loss
                pahofast.ack_many(c, [mid for g, mid in item[1] if g == gen])
                if item[2]:
                    self.ack_latencies.append(time.time() - item[2])
            else:
                _, topic, payload, qos, retain = item
                if connected:
                    c.publish(topic, payload, qos=qos, retain=retain)

    def _backoff(self, delay: float) -> None:
        # Full jitter on the upper half: tenants restarting together do not stampede the broker.
        self._stop.wait(delay * (0.5 + random.random() / 2))

    def _lost(self, rc: MQTTErrorCode) -> None:
        """The loop reported a dead connection; make sure the socket is closed before retrying."""
        if self.state.connected:
            self._on_disconnect(self._client, None, None, f"loop error {rc}", None)
        if self._socket_open():
            try:
                self._client.disconnect()
            except Exception:  # noqa: BLE001
                pass

    def _shutdown(self) -> None:
        self._drain_outbox()
        if self.state.connected:
            info = self._client.publish(self.status_topic, "offline", qos=1, retain=True)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not info.is_published() and self.state.connected:
                if self._loop_once() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            self._client.disconnect()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and self._socket_open():
                self._client.loop(LOOP_TIMEOUT_S)
        self.state.connected = False

    # ---- paho callbacks (network thread) ------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            value = reason_code.value
            refused = auth_refused(value, self.v5)
            reason = f"broker refused the connection: {reason_code}"
            self.state.last_error = reason
            if refused and self.state.connects == 0:
                self.fatal = BrokerAuthError(f"{reason} (client id {self.client_id!r}, user "
                                             f"{self.broker.username!r}); check broker.username and the password")
            log.error("%s", reason)
            return
        st = self.state
        st.generation += 1
        st.connects += 1
        if st.connects > 1:
            st.reconnects += 1
        st.connected = True
        st.last_connected_at = time.time()
        st.last_error = None
        if not flags.session_present:
            if self._had_session:
                st.session_gaps += 1
                log.warning("broker has no session for %s (session_present=False): messages queued while we "
                            "were away may be lost (broker restart without persistence, expiry or takeover)",
                            self.client_id)
        self._had_session = True
        log.info("connected to %s:%s (generation %d, session_present=%s)", self.broker.host, self.broker.port,
                 st.generation, flags.session_present)
        self._subscribe(client)
        client.publish(self.status_topic, "online", qos=1, retain=True)
        if self._owner_topic:
            client.publish(self._owner_topic, self._owner_payload, qos=1, retain=True)

    def _subscribe(self, client: paho.Client) -> None:
        previous = self._read_subscriptions()
        wanted = [s for s, _ in self.subscriptions]
        stale = [s for s in previous if s not in wanted]
        if stale:
            log.info("unsubscribing filters no longer routed: %s", ", ".join(stale))
            client.unsubscribe(stale)
        if self.v5:
            # retainHandling=1: retained messages only for a subscription that did not exist yet.
            topics = [(s, SubscribeOptions(qos=q, retainHandling=1)) for s, q in self.subscriptions]
        else:
            topics = list(self.subscriptions)
        if topics:
            self._subscribe_mid = client.subscribe(topics)[1]
        if self._owner_topic:   # QoS 0, always with the retained record (not part of the session's routes)
            opts = SubscribeOptions(qos=0, retainHandling=0) if self.v5 else 0
            client.subscribe(self._owner_topic, options=opts) if self.v5 else client.subscribe(self._owner_topic, 0)
        self._write_subscriptions(wanted)

    def _read_subscriptions(self) -> list[str]:
        if not self._subs_file:
            return []
        try:
            data = json.loads(self._subs_file.read_text())
            return [s for s in data.get("filters", []) if isinstance(s, str)]
        except (OSError, ValueError, AttributeError):
            return []

    def _write_subscriptions(self, filters: list[str]) -> None:
        if not self._subs_file:
            return
        tmp = self._subs_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"client_id": self.client_id, "filters": filters}))
            tmp.replace(self._subs_file)
        except OSError as exc:
            log.warning("cannot record subscriptions in %s: %s", self._subs_file, exc)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        if mid != self._subscribe_mid:
            return
        failures = []
        for (sub, qos), rc in zip(self.subscriptions, reason_codes):
            if rc.is_failure:
                failures.append(f"{sub}: {rc}")
            elif rc.value < qos:
                log.warning("broker granted QoS %d for %s (asked %d)", rc.value, sub, qos)
        self.state.subscribe_failures = tuple(failures)
        for f in failures:
            log.error("broker refused subscription %s", f)

    def _owner_record(self, payload: str) -> None:
        if payload and payload != self._owner_payload and payload != self.twin and owner.is_live_other(payload):
            self.twin = payload
            self._twin_is_older = owner.started_at(payload) < self._started_at
            log.error("another process uses this name and client id %r: %s (host:pid:start)", self.client_id, payload)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        st = self.state
        if st.connected and self._stop.is_set():
            log.info("disconnected from broker (stopping)")
        elif st.connected:
            log.warning("disconnected from broker: %s", reason_code)
            st.last_error = f"disconnected: {reason_code}"
            st.last_disconnected_at = time.time()
            # Takeover heuristic: Mosquitto 2.0.11 sends no "session taken over" code, so a
            # connection that keeps dying within seconds of CONNACK is the only sign of a twin.
            lived = st.last_disconnected_at - (st.last_connected_at or 0)
            self._short_lived = self._short_lived + 1 if lived < 5 else 0
            # The newcomer yields: the copy that was there first waits twice as many rounds, so the
            # fight ends with the misconfigured copy just started stopping, not the one in service.
            rounds = self._takeover_rounds * (1 if self._twin_is_older else 2)
            if self._takeover_rounds and self.twin and self._short_lived >= rounds:
                self.fatal = TakeoverDetected(
                    f"client id {self.client_id!r} was disconnected {self._short_lived} times within seconds of "
                    f"connecting: another client is using the same client id ({self.twin}); "
                    "stopping instead of fighting")
                log.error("%s", self.fatal)
                self._stop.set()
        st.connected = False

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        """paho's on_message, used only where ``pahofast.direct_publish`` cannot be applied."""
        self._on_publish(msg._topic, msg.payload, msg.qos, msg.retain, msg.mid, msg.dup,
                         getattr(msg, "properties", None))

    def _on_publish(self, topic: bytes, payload: bytes, qos: int, retain: bool, mid: int, dup: bool,
                    properties: Properties | None) -> None:
        """Every PUBLISH from the broker (network thread): into a ``Message``, into the intake."""
        if qos == 0 and self._owner_topic_b is not None and topic == self._owner_topic_b:
            self._owner_record(payload.decode("utf-8", "replace"))
            return
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError:   # a broker that let an invalid topic through: keep the message
            text = topic.decode("utf-8", "replace")
        self._deliver(Message(text, payload, qos, retain, mid, dup, time.time(),
                              None, None, self.state.generation, properties))
