"""`mqttd check`'s look at the broker: connect with a clean session, see what it grants, leave.

It connects as the daemon's client id + ``-check``, so it never takes over the daemon's persistent
session or consumes its messages (SPEC §2).
"""
from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass

from paho.mqtt.enums import MQTTErrorCode

from ..config import BrokerConfig
from .client import auth_refused, new_client


@dataclass
class ProbeResult:
    connected: bool
    error: str | None = None
    granted: list[tuple[str, str]] | None = None    # (subscription, reason)
    dropped: int | None = None                       # $SYS/broker/publish/messages/dropped
    auth_refused: bool = False                       # CONNACK said: bad credentials / not authorised


def probe_broker(broker: BrokerConfig, client_id: str, subscriptions: list[tuple[str, int]],
                 timeout: float = 10.0) -> ProbeResult:
    """Connect with a clean session as ``client_id`` (the daemon's id + "-check"), subscribe every
    filter to see what the broker grants, read the $SYS dropped counter if allowed, disconnect.
    It never touches the daemon's persistent session."""
    v5 = broker.protocol == "5"
    c = new_client(broker, client_id, persistent=False)
    result = ProbeResult(False)
    done = threading.Event()
    subs = list(subscriptions)

    def on_connect(client, userdata, flags, rc, props):  # noqa: ANN001
        if rc.is_failure:
            result.error = f"broker refused the connection: {rc}"
            result.auth_refused = auth_refused(rc.value, v5)
            done.set()
            return
        result.connected = True
        topics = subs + [("$SYS/broker/publish/messages/dropped", 0)]
        client.subscribe(topics)

    def on_subscribe(client, userdata, mid, codes, props):  # noqa: ANN001
        result.granted = [(s, "refused: " + str(rc) if rc.is_failure else f"granted QoS {rc.value}")
                          for (s, _), rc in zip(subs, codes)]
        if codes[-1].is_failure:
            done.set()

    def on_message(client, userdata, msg):  # noqa: ANN001
        if msg.topic == "$SYS/broker/publish/messages/dropped":
            try:
                result.dropped = int(msg.payload)
            except ValueError:
                pass
            done.set()

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    try:
        c.connect(broker.host, broker.port, broker.keepalive)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return ProbeResult(False, f"cannot connect to {broker.host}:{broker.port}: {exc}")
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        if c.loop(0.1) not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            if result.error is None and not result.connected:
                result.error = "connection closed by broker"
            break
        if result.granted is not None and time.monotonic() > deadline - timeout + 2:
            break       # $SYS may be denied or slow; the grants are what matters
    if not result.connected and result.error is None:
        result.error = f"no answer from {broker.host}:{broker.port} within {timeout:.0f}s"
    try:
        c.disconnect()
    except Exception:  # noqa: BLE001
        pass
    return result
