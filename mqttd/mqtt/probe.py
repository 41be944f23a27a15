"""`mqttd check`'s look at the broker: the broker as it is, not as configured.

It connects as the daemon's client id + ``-check``, so it never takes over the daemon's
persistent session or consumes its messages, and reports:

- the protocol spoken (``protocol = "auto"`` negotiated as the daemon does; an explicit "5" that
  the broker refuses is ``protocol_refused``, exit 78 in ``check`` as in ``run``);
- the CONNACK's grants (``grants.py``): session expiry, keepalive, maximum QoS, retained messages
  (and so retained wills), shared subscriptions, the broker's receive maximum;
- the in-flight window it really gets: QoS 1 messages to a topic of its own, never acked, counted
  until no more come (RabbitMQ's ``mqtt.prefetch``, Mosquitto's ``max_inflight_messages`` ...);
- whether a persistent session survives a reconnect: two connects under the check client id with
  a persistent session, ``session_present`` must be true the second time; cleaned up afterwards;
- which broker it is ($SYS/broker/version where published, else from behaviour) and so which
  known caveats bear on the delivery promise or the speed (``caveats``, in ``findings`` with
  ``ProbeResult``: what was found, apart from how).
"""
from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqttd.config import BrokerConfig
from mqttd.mqtt import grants as grants_mod
from mqttd.mqtt.client import auth_refused, new_client
from mqttd.mqtt.findings import WINDOW_MESSAGES, ProbeResult, caveats
from mqttd.mqtt.negotiate import OK_RC, refusal_of_5

WINDOW_QUIET_S = 1.0      # no new delivery for this long: the window is full
SESSION_CHECK_EXPIRY = 120


def first_reachable(broker: BrokerConfig, timeout: float = 5.0) -> tuple[BrokerConfig, list[str]]:
    """With ``broker.hosts``: the config narrowed to the first node that accepts a TCP connection
    (the first node when none does, so that the probe reports why), and a note per node that
    does not. Without: ``broker`` as it is."""
    nodes = broker.nodes()
    if len(nodes) == 1:
        return broker, []
    notes = []
    for host, port in nodes:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            notes.append(f"broker node {host}:{port} (broker.hosts) does not answer: {exc}")
            continue
        return dataclasses.replace(broker, host=host, port=port, hosts=()), notes
    return dataclasses.replace(broker, host=nodes[0][0], port=nodes[0][1], hosts=()), notes


def negotiate(broker: BrokerConfig, client_id: str, timeout: float, result: ProbeResult) -> str | None:
    """The protocol to probe with, as the daemon would speak it; None when nothing can connect
    (``result.error`` says why) or protocol = "5" is refused (``result.protocol_refused``)."""
    if broker.protocol == "3.1.1":
        return "3.1.1"
    why, outcome = refusal_of_5(broker, client_id, timeout)
    if why is None:
        return "5"          # the main probe reports errors and refusals (credentials ...) itself
    if broker.protocol == "5":
        result.protocol_refused = why
        return None
    result.protocol_note = f"the broker refused MQTT 5 ({why})"
    result.broker_kind = "rabbitmq" if outcome == "closed" else None
    return "3.1.1"


def session_survives(broker: BrokerConfig, client_id: str, protocol: str, topic: str,
                     timeout: float) -> tuple[bool | None, str]:
    """Connect twice with a persistent session (and one subscription in it) as ``client_id``:
    is the session present the second time? The session is ended afterwards."""
    v5 = protocol == "5"

    def connect(clean: bool, expiry: int) -> tuple[bool | None, str]:
        c = new_client(broker, client_id, persistent=not clean, reconnect_on_failure=False, protocol=protocol)
        seen: list[tuple[bool, bool, str]] = []
        c.on_connect = lambda cl, u, f, rc, p: seen.append((rc.is_failure, f.session_present, str(rc)))  # noqa: ARG005
        subacked = threading.Event()
        c.on_subscribe = lambda *a: subacked.set()
        try:
            if v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = expiry
                c.connect(broker.host, broker.port, broker.keepalive, clean_start=clean, properties=props)
            else:
                c.connect(broker.host, broker.port, broker.keepalive)
            deadline = time.monotonic() + timeout
            while not seen and time.monotonic() < deadline and c.loop(0.1) in OK_RC:
                pass
            if seen and not seen[0][0] and expiry:
                c.subscribe(topic, 1)
                while not subacked.is_set() and time.monotonic() < deadline and c.loop(0.1) in OK_RC:
                    pass
        except (OSError, ssl.SSLError, ValueError) as exc:
            return None, str(exc)
        finally:
            try:
                c.disconnect()
                c.loop(0.1)
            except Exception:  # noqa: BLE001
                pass
        if not seen:
            return None, "no CONNACK"
        if seen[0][0]:
            return None, seen[0][2]
        return seen[0][1], ""

    def connect_again(clean: bool, expiry: int) -> tuple[bool | None, str]:
        # A broker still closing the previous connection under this id may drop the next one
        # (RabbitMQ, NATS: seen here): a few tries, a second apart.
        for _ in range(3):
            present, why = connect(clean, expiry)
            if present is not None:
                break
            time.sleep(1.0)
        return present, why

    try:
        first, why = connect_again(clean=False, expiry=SESSION_CHECK_EXPIRY)
        if first is None:
            return None, f"could not connect with a persistent session: {why}"
        second, why = connect_again(clean=False, expiry=SESSION_CHECK_EXPIRY)
        if second is None:
            return None, f"could not reconnect with a persistent session: {why}"
        return second, "" if second else "the broker kept no session across a reconnect (session_present=False)"
    finally:
        connect_again(clean=True, expiry=0)    # end the check's session (a clean session, expiry 0)


def probe_broker(broker: BrokerConfig, client_id: str, subscriptions: list[tuple[str, int]],
                 timeout: float = 10.0, share_topic: str | None = None, share_group: str | None = None,
                 window_topic: str | None = None, session_topic: str | None = None,
                 receive_maximum: int | None = None) -> ProbeResult:
    """Connect with a clean session as ``client_id`` (the daemon's id + "-check"), subscribe every
    filter to see what the broker grants, read $SYS, measure the in-flight window on
    ``window_topic`` and the session's survival on ``session_topic`` (each skipped when None),
    disconnect. It never touches the daemon's persistent session.

    ``share_topic``/``share_group``: also subscribe ``$share/GROUP/TOPIC`` and publish one message
    to TOPIC: ``shared`` says whether it came back (brokers without shared subscriptions accept
    the filter and deliver nothing through it)."""
    result = ProbeResult(False)
    protocol = negotiate(broker, client_id, timeout, result)
    if protocol is None:
        return result
    result.protocol = protocol
    v5 = protocol == "5"
    c = new_client(broker, client_id, persistent=False, manual_ack=True, protocol=protocol)
    done = threading.Event()
    subs = list(subscriptions)
    sys_topics = ["$SYS/broker/publish/messages/dropped", "$SYS/broker/version"]
    window: list[float] = []
    state: dict[str, int | None] = {"main_mid": None, "window_mid": None, "q2_mid": None}

    def on_connect(client, userdata, flags, rc, props):  # noqa: ANN001
        if rc.is_failure:
            result.error = f"broker refused the connection: {rc}"
            result.auth_refused = auth_refused(rc.value, v5)
            done.set()
            return
        result.connected = True
        result.grants = grants_mod.from_connack(props, protocol, broker.session_expiry, broker.keepalive)
        if share_topic and getattr(props, "SharedSubscriptionAvailable", 1) == 0:
            result.shared, result.shared_reason = False, "the broker's CONNACK says SharedSubscriptionAvailable: 0"
        state["main_mid"] = client.subscribe(subs + [(t, 0) for t in sys_topics])[1]
        if share_topic and result.shared is None:
            share_sub = f"$share/{share_group}/{share_topic}"
            client.subscribe(share_sub, 1)
            client.publish(share_topic, b"mqttd check", qos=1)
        if window_topic:
            state["window_mid"] = client.subscribe(window_topic, 1)[1]
            state["q2_mid"] = client.subscribe(window_topic + "/qos2", 2)[1]   # NATS grants at most 1

    def on_subscribe(client, userdata, mid, codes, props):  # noqa: ANN001
        if mid == state.get("q2_mid"):
            result.qos2_granted = not codes[0].is_failure and codes[0].value == 2
            return
        if mid == state["window_mid"]:
            if not codes[0].is_failure:
                for i in range(WINDOW_MESSAGES):
                    client.publish(window_topic, f"mqttd check: in-flight window {i}", qos=1)
            return
        if mid != state["main_mid"]:
            return
        result.granted = [(s, "refused: " + str(rc) if rc.is_failure else f"granted QoS {rc.value}")
                          for (s, _), rc in zip(subs, codes, strict=False)]

    def on_message(client, userdata, msg):  # noqa: ANN001
        if share_topic and msg.topic == share_topic:
            result.shared = True
        elif window_topic and msg.topic == window_topic:
            window.append(time.monotonic())          # never acked: the broker's window fills up
        elif msg.topic == "$SYS/broker/publish/messages/dropped":
            try:
                result.dropped = int(msg.payload)
            except ValueError:
                pass
        elif msg.topic == "$SYS/broker/version":
            result.version = msg.payload.decode("utf-8", "replace")[:120]

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    try:
        if v5:
            props = None
            if receive_maximum:             # what the daemon asks, so the window is the daemon's
                props = Properties(PacketTypes.CONNECT)
                props.ReceiveMaximum = receive_maximum
            c.connect(broker.host, broker.port, broker.keepalive, clean_start=True, properties=props)
        else:
            c.connect(broker.host, broker.port, broker.keepalive)
    except (OSError, ssl.SSLError, ValueError) as exc:
        result.error = f"cannot connect to {broker.host}:{broker.port}: {exc}"
        return result
    start = time.monotonic()
    deadline = start + timeout
    while not done.is_set() and time.monotonic() < deadline:
        if c.loop(0.1) not in OK_RC:
            if result.error is None and not result.connected:
                result.error = "connection closed by broker"
            break
        now = time.monotonic()
        if result.granted is None or now < start + 2:
            continue                # $SYS may be denied or slow; the grants are what matters
        if share_topic and result.shared is None and now < start + 5:
            continue
        if window_topic and len(window) < WINDOW_MESSAGES and \
                now - (window[-1] if window else start) < WINDOW_QUIET_S + (0 if window else 2):
            continue
        break
    if window_topic and result.connected:
        result.window = len(window)
    if share_topic and result.connected and result.shared is None:
        result.shared = False
        result.shared_reason = f"the broker accepted $share/{share_group}/{share_topic} but delivered nothing through it"
    if not result.connected and result.error is None:
        result.error = f"no answer from {broker.host}:{broker.port} within {timeout:.0f}s"
    try:
        c.disconnect()
        c.loop(0.1)
    except Exception:  # noqa: BLE001
        pass
    if result.connected and session_topic:
        result.session_kept, result.session_note = session_survives(broker, client_id, protocol, session_topic, timeout)
    result.broker_kind, result.caveats = caveats(result)
    return result
