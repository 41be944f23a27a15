"""The broker's word: what an MQTT 5 CONNACK grants, against what mqttd asked.

A broker may lower the session expiry (ejabberd grants 300 s whatever is asked), impose a keepalive
(``ServerKeepAlive``), cap the QoS it accepts, refuse retained messages or shared subscriptions,
and bound how many QoS 1/2 PUBLISHes it takes in flight (its ``ReceiveMaximum``). The session
honours them (see ``SessionCallbacks._on_connect``), the status file shows them (``granted``), ``check``
prints them, and each one that differs from what was asked is a warning saying what it costs.

A 3.1.1 CONNACK grants nothing explicitly: the values are then what was asked, and ``None`` where
3.1.1 has no such notion (session expiry: a 3.1.1 session lasts until the broker's own limit).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("mqttd.session")

PAHO_INFLIGHT = 20     # paho's own limit on our QoS > 0 publishes in flight (max_inflight_messages)


@dataclass(frozen=True)
class Grants:
    protocol: str                          # "5" or "3.1.1": what this connection speaks
    session_expiry: int | None             # seconds the broker keeps the session once disconnected
    keepalive: int                         # seconds: what the client uses (the server's if it said)
    server_keepalive: int | None           # ServerKeepAlive as sent (None: not sent)
    receive_maximum: int                   # the broker's: our QoS 1/2 publishes it takes in flight
    maximum_qos: int
    retain_available: bool
    wildcard_subscriptions: bool
    shared_subscriptions: bool | None      # None: not said (3.1.1); proven by mqtt/shared.py where needed
    maximum_packet_size: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _get(properties: object, name: str) -> Any:
    return getattr(properties, name, None) if properties is not None else None


def effective_keepalive(asked: int, server: int | None) -> int:
    """The keepalive the client keeps: the server's (MQTT 5 §3.2.2.3.14) when it lowers ours.

    A larger one (or 0, "no keepalive") is honoured by never pinging less often than the server
    allows: pinging more often is always allowed (§3.12.4), and mqttd's own liveness checks (the
    daemon's watchdog: ``2 * broker.keepalive + 10``) stay right."""
    if server is None or server <= 0 or server > asked:
        return asked
    return server


def from_connack(properties: object, protocol: str, asked_expiry: int, asked_keepalive: int) -> Grants:
    v5 = protocol == "5"
    expiry = _get(properties, "SessionExpiryInterval") if v5 else None
    server_ka = _get(properties, "ServerKeepAlive") if v5 else None
    shared = _get(properties, "SharedSubscriptionAvailable") if v5 else None
    return Grants(
        protocol=protocol,
        session_expiry=(asked_expiry if expiry is None else int(expiry)) if v5 else None,
        keepalive=effective_keepalive(asked_keepalive, server_ka),
        server_keepalive=server_ka,
        receive_maximum=int(_get(properties, "ReceiveMaximum") or 65535) if v5 else 65535,
        maximum_qos=int(_get(properties, "MaximumQoS") if _get(properties, "MaximumQoS") is not None else 2),
        retain_available=_get(properties, "RetainAvailable") != 0,
        wildcard_subscriptions=_get(properties, "WildcardSubscriptionAvailable") != 0,
        shared_subscriptions=None if shared is None else bool(shared),
        maximum_packet_size=_get(properties, "MaximumPacketSize"),
    )


def _duration(seconds: int) -> str:
    if seconds % 86400 == 0 and seconds >= 86400:
        return f"{seconds // 86400} d"
    if seconds % 3600 == 0 and seconds >= 3600:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0 and seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def differences(g: Grants, asked_expiry: int, asked_keepalive: int) -> list[str]:
    """One warning per grant that differs from what mqttd asked (or needs), saying what it costs."""
    out = []
    if g.session_expiry is not None and g.session_expiry < asked_expiry:
        if g.session_expiry == 0:
            out.append(f"the broker grants no session expiry (0 s; {asked_expiry} s asked): the session ends with "
                       "every disconnect, so messages published while mqttd is away are lost")
        else:
            out.append(f"the broker grants a session expiry of {g.session_expiry} s ({asked_expiry} s asked): a "
                       f"daemon down or disconnected for more than {_duration(g.session_expiry)} loses its session "
                       "and every message queued in it")
    if g.server_keepalive is not None and g.server_keepalive != asked_keepalive:
        how = (f"using {g.keepalive} s" if g.keepalive == g.server_keepalive else
               f"still pinging every {g.keepalive} s (more often than the broker needs is allowed)")
        out.append(f"the broker sets the keepalive to {g.server_keepalive} s ({asked_keepalive} s asked): {how}")
    if g.maximum_qos < 1:
        out.append(f"the broker's maximum QoS is {g.maximum_qos}: subscriptions are granted at QoS 0, which the "
                   "broker neither queues nor redelivers: messages are lost across any disconnect")
    if not g.retain_available:
        out.append("the broker has no retained messages: the status topic and the owner record are published "
                   "without retain and the last will is not retained")
    if g.shared_subscriptions is False:
        out.append("the broker says SharedSubscriptionAvailable: 0 (no $share/ filters: no scale-out by numprocs)")
    if not g.wildcard_subscriptions:
        out.append("the broker says WildcardSubscriptionAvailable: 0: routes with + or # are refused")
    if g.receive_maximum < PAHO_INFLIGHT:
        out.append(f"the broker takes at most {g.receive_maximum} of our QoS 1 publishes in flight (ReceiveMaximum)")
    return out


class Honoured:
    """The grants of the current connection as the session honours them: its keepalive and
    receive maximum set on the client, our publishes within its MaximumQoS and RetainAvailable
    (either would otherwise be a protocol error), each difference logged once per distinct set."""

    def __init__(self, asked_expiry: int, asked_keepalive: int) -> None:
        self.asked_expiry, self.asked_keepalive = asked_expiry, asked_keepalive
        self.max_qos = 2
        self.retain = True            # False for good once a broker said it has no retained messages
        self._logged: dict | None = None

    def connack(self, client: Any, properties: object, protocol: str) -> Grants:
        g = from_connack(properties, protocol, self.asked_expiry, self.asked_keepalive)
        # paho already keeps a ServerKeepAlive; we keep the lower of it and ours (see effective_keepalive)
        client._keepalive = g.keepalive                           # no setter once connected
        self.max_qos, self.retain = g.maximum_qos, g.retain_available and self.retain
        if g.receive_maximum < client._max_inflight_messages:     # paho ignores the grant
            client._max_inflight_messages = g.receive_maximum     # both > 0
        granted = g.as_dict()
        if granted != self._logged:
            self._logged = granted
            for text in differences(g, self.asked_expiry, self.asked_keepalive):
                log.warning("%s", text)
        return g

    def publish(self, client: Any, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> Any:
        return client.publish(topic, payload, qos=min(qos, self.max_qos), retain=retain and self.retain)
