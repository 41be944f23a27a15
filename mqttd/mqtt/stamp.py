"""The gap-detection stamp on every message ``mqttd.publish`` sends at QoS 1 or 2 over MQTT 5
(docs/operations.md, "Gap detection"): user properties ``mqttd-pub`` (a publisher id never reused) and ``mqttd-seq``
(1, 2, 3 ... per publisher id, in the order the messages went on the wire).

Not on QoS 0: a broker may drop those by design (mosquitto drops QoS 0 for an offline
subscriber unless ``queue_qos0_messages``), so a missing one is not a gap. Not on MQTT 3.1.1,
which has no user properties: gap detection needs MQTT 5.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PUB_KEY = "mqttd-pub"
SEQ_KEY = "mqttd-seq"
_USER_PROPERTY = 0x26


def _str16(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@functools.lru_cache(maxsize=64)
def _prefix(pub: str) -> bytes:
    """Everything of the stamp but the sequence number: one per publisher id."""
    return (bytes([_USER_PROPERTY]) + _str16(PUB_KEY) + _str16(pub)
            + bytes([_USER_PROPERTY]) + _str16(SEQ_KEY))


class Stamp(Properties):
    """PUBLISH properties that are only the two user properties, packed once, byte for byte what
    paho's ``Properties.pack()`` writes for them (tested), without its per-message tables:
    building a paho ``Properties`` per message halved the publisher's rate (measured)."""

    def __init__(self, packed: bytes, pub: str, seq: int) -> None:  # noqa: D107 - no super(): see above
        d = self.__dict__
        d["packetType"] = PacketTypes.PUBLISH
        d["_packed"], d["_pub"], d["_seq"] = packed, pub, seq

    @classmethod
    def of(cls, pub: str, seq: int) -> Stamp:
        body = _prefix(pub) + _str16(str(seq))
        return cls(_varint(len(body)) + body, pub, seq)

    def pack(self) -> bytes:
        return self.__dict__["_packed"]

    def __getattr__(self, name: str) -> object:
        if name == "UserProperty":
            return [(PUB_KEY, self.__dict__["_pub"]), (SEQ_KEY, str(self.__dict__["_seq"]))]
        raise AttributeError(name)

    def __str__(self) -> str:
        return f"[UserProperty : [('{PUB_KEY}', '{self.__dict__['_pub']}'), ('{SEQ_KEY}', '{self.__dict__['_seq']}')]]"


def read(user_properties: Mapping[str, str]) -> tuple[str, int] | None:
    """``(publisher id, seq)`` from a received message's user properties (``Message.user_properties``),
    or None when it carries no well-formed stamp (not published by mqttd.publish, QoS 0, MQTT
    3.1.1, or forged)."""
    pub, seq = user_properties.get(PUB_KEY), user_properties.get(SEQ_KEY)
    if not pub or not isinstance(pub, str) or not isinstance(seq, str) or not seq.isdigit() or len(seq) > 18:
        return None
    return pub, int(seq)
