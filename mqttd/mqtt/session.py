"""The daemon's MQTT session: a persistent session on a network thread of its own.

Design (docs/delivery.md says what it promises; docs/architecture.md where this fits):
- One network thread of our own owns the paho client; no other thread ever touches it. Acks
  and publishes from other threads are queued in the ``Outbox`` (outbox.py: generation-stamped,
  so a stale ack is dropped, never sent on a newer connection) and wake the thread at once.
- Messages travel one way: every PUBLISH goes from ``_on_publish`` straight into the intake;
  past max_backlog the thread stops reading the socket instead of dropping (reader.py).
- Persistent session done right: clean_session=False on 3.1.1; clean_start=False on *every*
  connect plus an explicit SessionExpiryInterval on 5 (paho's defaults drop the session).
- A callback exception is not swallowed: it ends the network thread and the daemon's watchdog
  exits non-zero, so Supervisor restarts a clean process.
- The protocol is negotiated once per process (``negotiate.py``: "auto" falls back to 3.1.1 where
  5 is refused; an explicit "5" refused is exit 78); the client is rebuilt in ``_make_client``
  only. The CONNACK's grants are honoured and reported (``grants.py``). Nodes and backoff are in
  ``connector.py``; the paho callbacks (CONNACK, SUBACK, disconnect, PUBLISH), which run only
  on this thread, in ``callbacks.py``; subscriptions in ``subscriptions.py``; takeover evidence
  in ``owner.py``; the test-only fault hooks in ``faults.py``. An attempt that ends before CONNACK is logged once per
  distinct reason and counted in the status.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from mqttd.config import BrokerConfig
from mqttd.message import Message
from mqttd.mqtt import grants as grants_mod
from mqttd.mqtt import pahofast
from mqttd.mqtt.callbacks import SessionCallbacks
from mqttd.mqtt.client import new_client
from mqttd.mqtt.connector import STABLE_S, Connector
from mqttd.mqtt.negotiate import Negotiation
from mqttd.mqtt.outbox import Outbox, Waker
from mqttd.mqtt.owner import TakeoverWatch
from mqttd.mqtt.reader import Reader
from mqttd.mqtt.shared import SharedCheck
from mqttd.mqtt.state import Inbox, SessionState
from mqttd.mqtt.subscriptions import RememberedFilters, SubscribeRetry, subscribe

log = logging.getLogger("mqttd.session")

SHUTDOWN_POLL_S = 0.01  # the wait of each loop while the last packets go out at stop


class Session(SessionCallbacks):
    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        subscriptions: list[tuple[str, int]],
        intake: Inbox,
        max_backlog: int,
        status_topic: str,
        subscriptions_file: Path | None = None,
        receive_maximum: int = 1000,
        takeover_rounds: int = 0,
        owner_topic: str | None = None,
        shared: SharedCheck | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.intake = intake                         # every PUBLISH goes straight in (one-way flow)
        self.received = 0                            # messages put into the intake (network thread)
        self.status_topic = status_topic
        self._remembered = RememberedFilters(subscriptions_file, client_id)
        self._sub_retry = SubscribeRetry()             # refused filters are asked for again
        # Takeover evidence: our retained owner record on owner_topic, and someone else's
        # arriving after ours (a broker restart can never produce that; a twin always does).
        self._takeover = TakeoverWatch(owner_topic, client_id, takeover_rounds)
        self._subscribe_mid: int | None = None
        self.negotiation = Negotiation(broker.protocol)
        self.v5 = self.negotiation.v5
        self.keepalive = broker.keepalive            # what the connection keeps: the broker's if it lowers it
        self.grants = grants_mod.Honoured(broker.session_expiry, broker.keepalive)
        self.state = SessionState()
        self._shared = shared                  # the proof that $share/ filters deliver (shared.py)
        self.fatal: BaseException | None = None      # set when the thread ends on an error we must report
        self._stop = threading.Event()
        self._stop_reading = False
        self.conn = Connector(broker, client_id, self.state, self.negotiation, self._stop, receive_maximum)
        self._waker = Waker()
        self._outbox = Outbox(self._waker)
        self.ack_latencies = self._outbox.ack_latencies
        self.reader = Reader(self._waker, intake, max_backlog, self._on_publish)
        self.reader.keepalive = self.keepalive
        self._had_session = self._remembered.existed()
        self._client = self._make_client()
        self.thread = threading.Thread(target=self._run, name=f"mqttd-net-{client_id}", daemon=True)

    # ---- the client -------------------------------------------------------------------------
    def _make_client(self) -> paho.Client:
        """The paho client for the protocol negotiated so far, with every hook of ours: built at
        start and again only when the protocol (or the will's retain flag) changes."""
        self.v5 = self.negotiation.v5
        if self.v5:
            pahofast.apply()
        # reconnect_on_failure=False: the loop in _run reconnects, with our backoff and generations.
        client = new_client(self.broker, self.client_id, persistent=True, manual_ack=True,
                            reconnect_on_failure=False, protocol=self.negotiation.protocol)
        client.will_set(self.status_topic, "offline", qos=1, retain=self.grants.retain)
        pahofast.skip_filtered_callbacks(client)     # we never use message_callback_add
        rbuf = pahofast.RecvBuffer(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        # QoS 2 deliveries are ours (PUBREC after commit, PUBCOMP at once) wherever this applies;
        # otherwise paho's own QoS 2 flow (PUBREC at once, on_message at PUBREL, PUBCOMP on ack).
        self._direct = pahofast.direct_publish(client, self._on_publish)
        if not self._direct:
            client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.reader.attach(client, rbuf, self.v5)
        return client

    # ---- API for other threads -----------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def ack(self, messages: list[Message]) -> None:
        """The dispatcher's ``Acker``: queue the acks of a committed batch (outbox.py), sent by
        the network thread in the order given, only on the connection that delivered each
        message: PUBACK for QoS 1, PUBREC for QoS 2 (its PUBCOMP answers the broker's PUBREL)."""
        self._outbox.ack(messages)

    def is_current(self, message: Message) -> bool:
        """Would an ack of ``message`` go out now: is its connection the current, live one?"""
        return message.generation == self.state.generation and self.state.connected

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        self._outbox.publish(topic, payload, qos, retain)

    def stop_reading(self) -> None:
        """Stop taking messages (first step of a graceful stop); acks still go out."""
        self._stop_reading = True
        self._waker.poke()

    def stop(self, timeout: float = 5.0) -> None:
        """Flush queued acks, publish the retained offline status, disconnect, join."""
        self._stop.set()
        self._waker.poke()
        self.thread.join(timeout)

    def last_bytes_received(self) -> float | None:
        """Monotonic time of the last bytes from the broker (PINGRESP included), if known
        (paho 2.2 calls it ``_last_bytes_received``, 2.1 ``_last_msg_in``)."""
        c = self._client
        return getattr(c, "_last_bytes_received", getattr(c, "_last_msg_in", None))

    # ---- the network thread ----------------------------------------------------------------------
    def _run(self) -> None:
        conn, st = self.conn, self.state
        try:
            while not self._stop.is_set():
                conn.stable_check(time.monotonic())
                st.loop_beat = time.monotonic()
                if not st.connected and not self._socket_open():
                    if not conn.connect(self._client, self.v5):
                        st.connect_failures += 1
                        conn.note_failure(conn.failure_reason)
                        conn.nodes.advance()
                        conn.backoff.wait()
                        continue
                if conn.connack_overdue(time.monotonic(), self.keepalive):
                    self._lost(MQTTErrorCode.MQTT_ERR_CONN_LOST)    # TCP up but no CONNACK: broker stuck
                    self._before_connack(f"no CONNACK from the broker within {max(10, self.keepalive)}s")
                    conn.nodes.advance()
                    conn.backoff.wait()
                    continue
                rc = self.reader.step(self._stop_reading)
                st.paused_reading = self.reader.paused
                if st.connected and self._sub_retry.ready():
                    log.info("subscribing again (refused before: %s)", "; ".join(st.subscribe_failures))
                    self._subscribe_mid = subscribe(self._client, self.v5, self.subscriptions, None, self._remembered)
                self._outbox.drain(self._client, st.generation, st.connected, self._direct, self.grants.publish)
                if self._shared is not None and not self._shared.verified:
                    err = self._shared.overdue(st.connected)
                    if err is not None:
                        self._fail(err)
                        return
                if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                    before_connack = not st.connected and not conn.connack_ok
                    if not before_connack and time.monotonic() - conn.connected_at < STABLE_S:
                        st.connect_failures += 1        # closed at or soon after its CONNACK
                    self._lost(rc)
                    if self.fatal is None and before_connack and self._before_connack(None):
                        continue                    # a 3.1.1 attempt after 5 was refused: at once
                    if self.fatal is not None:
                        return
                    conn.nodes.advance()
                    conn.backoff.wait()
            self._shutdown()
        except BaseException as exc:  # noqa: BLE001 - reported by the watchdog, never swallowed
            self.fatal = exc
            log.critical("network thread died: %r", exc, exc_info=True)
            raise

    def _socket_open(self) -> bool:
        return self._client.socket() is not None

    def _before_connack(self, reason: str | None) -> bool:
        """An attempt ended before a successful CONNACK (connector.py decides what next).
        True: reconnect at once (a 3.1.1 attempt, or one without a retained will)."""
        then = self.conn.before_connack(reason, self.v5, self.grants.retain)
        if then.no_retain:
            self.grants.retain = False
        if then.rebuild:
            self._client = self._make_client()
        if then.error is not None:
            self._fail(then.error)
        return then.at_once

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
        st = self.state
        self._outbox.drain(self._client, st.generation, st.connected, self._direct, self.grants.publish)
        if st.connected:
            info = self.grants.publish(self._client, self.status_topic, "offline", qos=1, retain=True)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not info.is_published() and st.connected:
                if self.reader.loop_once(timeout=SHUTDOWN_POLL_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            self._client.disconnect()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and self._socket_open():
                self._client.loop(SHUTDOWN_POLL_S)
        st.connected = False
        self._waker.close()
