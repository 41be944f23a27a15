"""One place that builds a paho client from a ``BrokerConfig``: protocol, credentials, TLS.

Used by the daemon's session, `mqttd check`'s probe and the publisher, so that TLS verification
and credentials cannot differ between them. What each does with its session (persistent or
clean, manual acks) is the caller's choice, passed in explicitly.
"""
from __future__ import annotations

import ssl

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from mqttd.config import BrokerConfig

# CONNACK codes meaning "these credentials / this client id are refused" (v5 reason codes and
# v3.1.1 return codes). On the daemon's first connect they are a configuration error (exit 78).
AUTH_REFUSED_V5 = frozenset({0x85, 0x86, 0x87, 0x8C})
AUTH_REFUSED_V3 = frozenset({2, 4, 5})
# "This broker does not speak the protocol version asked": 0x84 on 5; a 3.1.1-only broker answers a
# v5 CONNECT with return code 1, which paho decodes as 0x84 too (seen on NATS 2.9).
UNSUPPORTED_PROTOCOL = frozenset({0x84, 1})


def wire_protocol(broker: BrokerConfig, protocol: str | None = None) -> str:
    """The protocol a client built for ``broker`` speaks: ``protocol`` (what a negotiation chose,
    ``mqttd.mqtt.negotiate``) or the configured one; "auto" un-negotiated is "3.1.1", which every
    broker speaks (the daemon and the publisher negotiate before they use it: ``Negotiation``,
    ``publisher_negotiation``)."""
    chosen = protocol or broker.protocol
    return "3.1.1" if chosen == "auto" else chosen


def new_client(broker: BrokerConfig, client_id: str, *, persistent: bool, manual_ack: bool = False,
               reconnect_on_failure: bool = True, protocol: str | None = None) -> paho.Client:
    """A paho client for ``broker`` speaking ``wire_protocol(broker, protocol)`` ("5" or "3.1.1").

    ``persistent`` only sets ``clean_session`` on 3.1.1: on 5 the session is chosen per connect
    (``clean_start`` plus a SessionExpiryInterval), which the caller passes to ``connect``."""
    if wire_protocol(broker, protocol) == "5":
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                             manual_ack=manual_ack, reconnect_on_failure=reconnect_on_failure)
    else:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                             clean_session=not persistent, manual_ack=manual_ack,
                             reconnect_on_failure=reconnect_on_failure)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls is not None:
        # Verification on by default; tls.insecure only skips the host-name check.
        client.tls_set(ca_certs=broker.tls.ca_certs, certfile=broker.tls.certfile, keyfile=broker.tls.keyfile,
                       cert_reqs=ssl.CERT_REQUIRED)
        client.tls_insecure_set(broker.tls.insecure)
    return client


def auth_refused(reason_code_value: int, v5: bool) -> bool:
    """Does this CONNACK code say the credentials or the client id are not accepted?"""
    return reason_code_value in AUTH_REFUSED_V5 or (not v5 and reason_code_value in AUTH_REFUSED_V3)
