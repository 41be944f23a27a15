"""QoS 1 PUBLISH packets encoded by us, many per buffer, for the publisher's connection (``outbound``).

Why: the publisher's profile (py-spy, ``publish_many`` of 10,000 over MQTT 3.1.1, 2026-12-07) spent
26% of its samples in paho's ``_sock_send``: paho writes every packet with its own ``send()``,
and builds each through ``publish()`` (an ``MQTTMessage``, its ``MQTTMessageInfo`` with a
``Condition``, a ``bytearray`` grown field by field, a dict per queued packet). Here a window's
worth of messages becomes one ``bytes``, queued on paho's connection as one packet, so one
``send()`` carries them all; each is still confirmed by its own PUBACK (``outfast.own_pubacks``).

The bytes are those paho's ``_send_publish`` writes for the same message (tested, MQTT 3.1.1
and 5, with and without the stamp, at the remaining-length boundaries 127/128/16383/16384).
"""
from __future__ import annotations

import functools

from mqttd.mqtt.stamp import _prefix, _str16, _varint

PUBLISH = 0x30
NO_PROPERTIES = b"\x00"       # MQTT 5: a property length of 0


@functools.lru_cache(maxsize=1024)
def topic_field(topic: str) -> bytes:
    """The topic as a length-prefixed UTF-8 string: one per topic, most messages share a few."""
    return _str16(topic)


def remaining_length(n: int) -> bytes:
    """MQTT's variable byte integer (1 to 4 bytes)."""
    if n < 128:
        return bytes((n,))
    if n < 16384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    return _varint(n)


def stamp_properties(pub: str, seq: int) -> bytes:
    """The MQTT 5 property block of the gap-detection stamp (``stamp.Stamp.of(pub, seq).pack()``)."""
    body = _prefix(pub) + _str16(str(seq))
    return _varint(len(body)) + body


def publish_qos1(topic: str, payload: bytes, mid: int, *, retain: bool = False, dup: bool = False,
                 properties: bytes | None = None) -> list[bytes]:
    """One QoS 1 PUBLISH as parts to join (``b"".join``; many messages join into one buffer).

    ``properties``: None for MQTT 3.1.1; MQTT 5's property block otherwise (``NO_PROPERTIES``
    when there are none, as paho writes a 0 length)."""
    field = topic_field(topic)
    size = len(field) + 2 + len(payload)
    if properties is not None:
        size += len(properties)
    head = bytes((PUBLISH | (dup << 3) | 2 | retain,)) + remaining_length(size) + field + mid.to_bytes(2, "big")
    if properties is None:
        return [head, payload]
    return [head, properties, payload]
