"""A measured speed-up at the paho edge (only mqttd.mqtt imports this module).

paho-mqtt 2.x builds three constant lookup tables (~40 entries, ~30 ``list.index`` calls) in
*every* ``Properties()`` - one per MQTT 5 PUBLISH received - and ``unpack()`` first scans all
40 names to ``clear()`` a fresh object. At 10k msg/s that was 20-40% of mqttd's CPU (py-spy,
see README "Benchmarks"). The tables are never mutated, so one shared copy is equivalent.

The patch is applied only if this paho's ``Properties`` has exactly the layout it was written
for; otherwise paho is left untouched and everything still works, only slower.
"""
from __future__ import annotations

import logging

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("mqttd.session")

_PRIVATE = ("packetType", "types", "names", "properties")
_applied = False


def apply() -> bool:
    """Share Properties' constant tables between instances. Idempotent; returns True if active."""
    global _applied
    if _applied:
        return True
    template = Properties(PacketTypes.PUBLISH)
    if set(vars(template)) != set(_PRIVATE) or not hasattr(Properties, "clear"):
        log.debug("paho Properties layout changed; decode speed-up not applied")
        return False
    types, names, props = template.types, template.names, template.properties
    original_init = Properties.__init__

    def __init__(self: Properties, packetType: int) -> None:  # noqa: N807 - paho's signature
        d = self.__dict__
        d["packetType"] = packetType
        d["types"] = types
        d["names"] = names
        d["properties"] = props

    def clear(self: Properties) -> None:
        # Set properties live in __dict__ under their compressed names; everything that is not
        # one of the four private attributes is a property (what paho's clear() deletes).
        d = self.__dict__
        for key in [k for k in d if k not in _PRIVATE]:
            del d[key]

    __init__.__wrapped__ = original_init  # type: ignore[attr-defined]
    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    _applied = True
    return True


class _NoFilteredCallbacks:
    """Stands in for paho's callback trie on a client that never calls message_callback_add:
    paho otherwise walks a generator over the empty trie for every message (~9% of CPU)."""

    def iter_match(self, topic: str) -> tuple:
        return ()

    def __iter__(self):  # noqa: ANN204
        return iter(())


def skip_filtered_callbacks(client: object) -> None:
    if hasattr(client, "_on_message_filtered"):
        client._on_message_filtered = _NoFilteredCallbacks()  # type: ignore[attr-defined]


_PUBACK = 0x40
_puback = __import__("struct").Struct("!BBH").pack


def ack_many(client: object, mids: list[int]) -> None:
    """Queue the PUBACKs of a whole batch as one write.

    paho's ``ack(mid, 1)`` queues each 4-byte PUBACK (0x40, 2, mid; the same on 3.1.1 and 5) as its
    own packet, with a socketpair poke and a ``send()`` each: ~11% of CPU at 20k msg/s. The
    concatenation is byte-for-byte what paho would write, in the same order, through paho's own
    out-queue (so it never interleaves with a partly written packet). Falls back to ``ack()``.
    """
    queue = getattr(client, "_packet_queue", None)
    if queue is None or len(mids) < 2:
        for mid in mids:
            client.ack(mid, 1)  # type: ignore[attr-defined]
        return
    queue(_PUBACK, b"".join([_puback(_PUBACK, 2, mid) for mid in mids]), 0, 1)
