"""Where and when the session connects: the broker's nodes in turn, the reconnect backoff, and
each attempt up to its CONNACK (``Connector``).

``broker.hosts`` lists the nodes of a clustered broker: the session starts with the first and
moves to the next after a failed connect or a lost connection, round the list (one node for
``host``/``port``). The backoff doubles from ``reconnect_min`` to ``reconnect_max`` with full
jitter on its upper half, and is reset only by a connection that stayed up ``STABLE_S``: one
closed at (or soon after) CONNACK, or before it, is no sign that the broker will have us.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqttd.config import BrokerConfig
from mqttd.mqtt.client import UNSUPPORTED_PROTOCOL
from mqttd.mqtt.negotiate import BACK_TO_5, CONFIRM_311, REFUSED, TRY_311, Negotiation, speaks_311

log = logging.getLogger("mqttd.session")

STABLE_S = 5.0          # a connection that stayed up this long resets the reconnect backoff
RETAIN_NOT_SUPPORTED = 0x9A


class Nodes:
    def __init__(self, broker: BrokerConfig) -> None:
        self._broker = broker
        self._nodes = broker.nodes()
        self._i = 0

    def current(self) -> BrokerConfig:
        """The broker config narrowed to the node in use (host/port that node's, no hosts)."""
        host, port = self._nodes[self._i]
        return dataclasses.replace(self._broker, host=host, port=port, hosts=())

    def name(self) -> str:
        host, port = self._nodes[self._i]
        return f"{host}:{port}"

    def advance(self) -> None:
        """After a failed connect or a lost connection: the next node, if there are several."""
        if len(self._nodes) > 1:
            self._i = (self._i + 1) % len(self._nodes)
            log.info("next broker node: %s", self.name())


class Backoff:
    def __init__(self, low: float, high: float, stop: threading.Event) -> None:
        self.low, self.high, self._stop = low, high, stop
        self.delay = low

    def wait(self) -> None:
        """Wait the current delay (or until stopped), then double it up to the maximum."""
        # Full jitter on the upper half: tenants restarting together do not stampede the broker.
        self._stop.wait(self.delay * (0.5 + random.random() / 2))
        self.delay = min(self.delay * 2, self.high)

    def reset(self) -> None:
        self.delay = self.low


@dataclass
class AfterFailure:
    """What the session does after an attempt that ended before a successful CONNACK."""
    at_once: bool = False                  # reconnect now, without backoff (a 3.1.1 attempt ...)
    rebuild: bool = False                  # with a new client (protocol or will changed)
    no_retain: bool = False                # the broker has no retained messages
    error: Exception | None = None         # stop: the broker will never have us (exit 78)


class Connector:
    """The connect attempts of one session (network thread): which node, the wait for CONNACK,
    the failures before it (logged once per distinct reason, counted in the status), and what
    the protocol negotiation makes of them."""

    def __init__(self, broker: BrokerConfig, client_id: str, state: Any, negotiation: Negotiation,
                 stop: threading.Event, receive_maximum: int) -> None:
        self.broker, self.client_id, self.state, self.negotiation = broker, client_id, state, negotiation
        self.receive_maximum = receive_maximum
        self.nodes = Nodes(broker)
        self.backoff = Backoff(broker.reconnect_min, broker.reconnect_max, stop)
        self.started = 0.0                   # monotonic: the connect() began, then the wait for CONNACK
        self.connected_at = 0.0              # monotonic: the last successful CONNACK
        self.connack_ok = False              # this attempt got a successful CONNACK
        self.connack_code: int | None = None  # ... or a refusal with this code
        self.connack_reason = ""
        self.failure_reason = ""
        self._failure_logged: str | None = None   # the last pre-CONNACK failure reason logged

    def stable_check(self, now: float) -> None:
        """Only a connection that stayed up STABLE_S resets the backoff and the failure count."""
        st, b = self.state, self.backoff
        if st.connected and now - self.connected_at >= STABLE_S and (b.delay > b.low or st.connect_failures):
            b.reset()
            st.connect_failures = 0
            self._failure_logged = None

    def connack_overdue(self, now: float, keepalive: int) -> bool:
        """TCP up but no CONNACK within max(10, keepalive): the broker is stuck."""
        return not self.state.connected and now - self.started > max(10, keepalive)

    def connect(self, client: paho.Client, v5: bool) -> bool:
        """One connect() to the current node, always asking for the persistent session (MQTT 5:
        clean_start=False and an explicit SessionExpiryInterval on *every* connect; paho's
        defaults drop the session). False (with ``failure_reason``) if it failed."""
        b = self.nodes.current()
        st = self.state
        st.broker = self.nodes.name()
        self.started = time.monotonic()
        st.connecting_since = self.started
        self.connack_ok, self.connack_code = False, None
        try:
            if v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = b.session_expiry
                props.ReceiveMaximum = self.receive_maximum
                client.connect(b.host, b.port, b.keepalive, clean_start=False, properties=props)
            else:
                client.connect(b.host, b.port, b.keepalive)
            return True
        except (OSError, ssl.SSLError, socket.gaierror, ValueError) as exc:
            self.failure_reason = f"cannot connect to {b.host}:{b.port}: {exc}"
            return False
        finally:
            now = time.monotonic()
            took = now - self.started
            self.started = now                       # the wait for CONNACK starts now
            st.loop_beat = now                       # (before connecting_since: the watchdog reads both)
            st.connecting_since = None
            if took > 10:
                log.warning("connecting to %s:%s took %.0fs (slow DNS or network)", b.host, b.port, took)

    def note_failure(self, reason: str) -> None:
        """An attempt that got no connection: logged once per distinct reason (until a connection
        stays up), in the status as ``last_error`` with the count of attempts in a row."""
        st = self.state
        if reason != self._failure_logged:
            self._failure_logged = reason
            log.warning("%s (retrying with backoff)", reason)
        st.last_error = f"{reason} (attempt {st.connect_failures})"

    def before_connack(self, reason: str | None, v5: bool, retain: bool) -> AfterFailure:
        """The attempt ended without a successful CONNACK: count it, log it, and let the protocol
        negotiation decide what comes next."""
        b, st, neg = self.nodes.current(), self.state, self.negotiation
        st.connect_failures += 1
        code = self.connack_code
        lived = time.monotonic() - self.started
        if reason is None:
            reason = (self.connack_reason if code is not None else
                      f"the broker at {b.host}:{b.port} closed the connection before any CONNACK")
        self.note_failure(f"{reason} (MQTT {neg.protocol} CONNECT)")
        if code == RETAIN_NOT_SUPPORTED and retain:
            log.warning("the broker has no retained messages (CONNACK 0x9A): the last will is sent without retain")
            return AfterFailure(at_once=True, rebuild=True, no_retain=True)
        action = neg.failed(unsupported=v5 and code in UNSUPPORTED_PROTOCOL,
                            closed_early=code is None and lived < 5.0, ever_connected=st.connects > 0)
        if action == TRY_311:
            log.info('the broker refused MQTT 5 (%s): trying MQTT 3.1.1 (protocol = "auto")', neg.reason)
            return AfterFailure(at_once=True, rebuild=True)
        if action == BACK_TO_5:
            return AfterFailure(rebuild=True)
        if action == REFUSED or (action == CONFIRM_311 and speaks_311(b, f"{self.client_id}-v311")):
            return AfterFailure(error=neg.refusal(b))
        return AfterFailure()
