"""The session's paho callbacks, on its network thread (``mqttd.mqtt.session`` owns the thread
and the client; nothing here is called from any other thread, so the single paho-owning thread
design holds: these only run inside that thread's ``client.loop``).

- ``_on_connect``: the CONNACK. Refused: recorded, and fatal when the credentials are refused on
  the first connect. Accepted: the grants honoured (``grants.py``), a session gap counted when
  the broker lost our session, the shared-subscription check (``shared.py``), the subscriptions
  sent (on the first connect, the broker keeps them after), the online status and owner record.
- ``_on_subscribe``: the SUBACK's failures; ``_on_disconnect``: the state, and takeover evidence.
- ``_on_publish`` (and paho's ``_on_message`` where ``pahofast.direct_publish`` cannot be
  applied): every PUBLISH into a ``Message``, into the intake.

A mixin of ``Session``, which sets the state declared here in its ``__init__``.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from paho.mqtt.properties import Properties

from mqttd.config import BrokerConfig
from mqttd.errors import BrokerAuthError, TakeoverDetected
from mqttd.message import Message
from mqttd.mqtt import faults
from mqttd.mqtt import grants as grants_mod
from mqttd.mqtt.client import auth_refused
from mqttd.mqtt.connector import Connector
from mqttd.mqtt.negotiate import Negotiation
from mqttd.mqtt.owner import TakeoverWatch
from mqttd.mqtt.reader import Reader
from mqttd.mqtt.shared import SharedCheck
from mqttd.mqtt.state import Inbox, SessionState
from mqttd.mqtt.subscriptions import RememberedFilters, SubscribeRetry, suback_failures, subscribe

log = logging.getLogger("mqttd.session")


class SessionCallbacks:
    """paho's callbacks for ``Session`` (network thread only), and ``_fail``."""

    broker: BrokerConfig
    client_id: str
    subscriptions: list[tuple[str, int]]
    intake: Inbox
    received: int
    status_topic: str
    _remembered: RememberedFilters
    _sub_retry: SubscribeRetry
    _takeover: TakeoverWatch
    _subscribe_mid: int | None
    negotiation: Negotiation
    v5: bool
    keepalive: int
    grants: grants_mod.Honoured
    state: SessionState
    _shared: SharedCheck | None
    fatal: BaseException | None
    _stop: threading.Event
    conn: Connector
    reader: Reader
    _had_session: bool


    def _fail(self, err: Exception) -> None:
        """End with ``err`` (reported by the daemon, which exits with its code)."""
        if self.fatal is None:
            self.fatal = err
            log.error("%s", err)

    # ---- paho callbacks (network thread) ------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            value = reason_code.value
            refused = auth_refused(value, self.v5)
            reason = f"broker refused the connection: {reason_code}"
            self.conn.connack_code, self.conn.connack_reason = value, reason
            self.state.last_error = reason
            if refused and self.state.connects == 0:
                self.fatal = BrokerAuthError(f"{reason} (client id {self.client_id!r}, user "
                                             f"{self.broker.username!r}); check broker.username and the password")
                log.error("%s", reason)
            return                      # logged (once per reason) and counted by _before_connack
        self.conn.connack_ok = True
        self.conn.connected_at = time.monotonic()
        settled = self.negotiation.connected()
        if settled:
            log.warning("%s", settled)
        g = self.grants.connack(client, properties, self.negotiation.protocol)
        self.keepalive = self.reader.keepalive = g.keepalive
        st = self.state
        st.protocol, st.granted = g.protocol, g.as_dict()
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
        log.info("connected to %s (MQTT %s, generation %d, session_present=%s)", st.broker,
                 self.negotiation.protocol, st.generation, flags.session_present)
        if self._shared is not None:
            err = self._shared.connack(properties)
            if err is not None:
                self._fail(err)
                return
        if faults.hooks.resubscribe or st.connects == 1:
            self._sub_retry.cancel()
            self._subscribe_mid = subscribe(client, self.v5, self.subscriptions, self._takeover.topic,
                                            self._remembered)
        if self._shared is not None and self._shared.probe_due():
            self.grants.publish(client, self._shared.topic, json.dumps({"probe": self.client_id}), qos=1)
        self.grants.publish(client, self.status_topic, "online", qos=1, retain=True)
        if self._takeover.topic and self.grants.retain:      # the record is only evidence when retained
            self.grants.publish(client, self._takeover.topic, self._takeover.payload, qos=1, retain=True)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        if mid == self._subscribe_mid:
            self.state.subscribe_failures, err = suback_failures(self.subscriptions, reason_codes, self._shared)
            if err is not None:
                self._fail(err)
            elif self.state.subscribe_failures:
                log.warning("asking again for the refused subscriptions in %.0fs", self._sub_retry.refused())
            else:
                self._sub_retry.granted()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        st = self.state
        if self._shared is not None:
            self._shared.disconnected()
        if st.connected and self._stop.is_set():
            log.info("disconnected from broker (stopping)")
        elif st.connected:
            log.warning("disconnected from broker: %s", reason_code)
            st.last_error = f"disconnected: {reason_code}"
            st.last_disconnected_at = time.time()
            takeover = self._takeover.disconnected(st.last_disconnected_at - (st.last_connected_at or 0))
            if takeover is not None:
                self.fatal = TakeoverDetected(takeover)
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
        if faults.hooks.before_intake is not None:
            faults.hooks.before_intake(topic)
        if self._shared is not None and not self._shared.verified:
            self._shared.received(topic)
        if qos == 0 and self._takeover.topic_b is not None and topic == self._takeover.topic_b:
            self._takeover.record(payload)
            return
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError:   # a broker that let an invalid topic through: keep the message
            text = topic.decode("utf-8", "replace")
        self.received += 1
        self.intake.put(Message(text, payload, qos, retain, mid, dup, time.time(),
                                None, None, self.state.generation, properties))
