"""Measured speed-ups at the paho edge (only mqttd.mqtt imports this module).

Each was found with py-spy on scripts/bench and keeps paho's behaviour on the wire:
- ``apply``: shared constant tables in paho's ``Properties`` (built anew for every MQTT 5
  PUBLISH: 20-40% of mqttd's CPU at 10k msg/s);
- ``skip_filtered_callbacks``: no walk of an empty callback trie per message;
- ``ack_many``: a batch's PUBACKs written as one buffer, byte for byte what paho would write;
- ``RecvBuffer``: the socket read 64 KiB at a time, and whole QoS 0/1 PUBLISH packets decoded
  from that buffer without paho's per-packet bookkeeping;
- ``direct_publish``: the PUBLISH packets paho does read go to the session without an
  ``MQTTMessage`` (and its ``threading.Condition``) each.
Each is applied only if this paho has the layout it was written for, and tested against paho's
own decoding; otherwise paho is left as it is and everything still works, only slower.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from paho.mqtt import _packet
from paho.mqtt.client import time_func as _time_func
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("mqttd.session")

_PRIVATE = ("packetType", "types", "names", "properties")
_applied = False


def apply() -> bool:
    """Share Properties' constant tables between instances. Idempotent; returns True if active.

    paho builds three lookup tables (~40 entries, ~30 ``list.index`` calls) in every
    ``Properties()``, and ``unpack()`` scans all 40 names to ``clear()`` the fresh object. The
    tables are never mutated, so one shared copy is equivalent."""
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


RECV_CHUNK = 65536


class RecvBuffer:
    """Reads the socket in 64 KiB chunks and hands paho the few bytes it asks for at a time.

    paho reads every packet with at least three ``recv()`` calls (command byte, each byte of the
    remaining length, the body) and one ``select()`` per packet: for a 100-byte PUBLISH that was
    ~20% of mqttd's CPU (py-spy). Installed on one client as its ``_sock_recv``; paho's own
    parsing and error handling are untouched (EOF is still ``b""``, "no data" still
    ``BlockingIOError``).

    Bytes already buffered do not wake ``select()``: while ``pending()`` is non-zero the owner
    takes packets with ``take_publish()`` or, for anything else, paho's ``loop_read()``. The
    buffer belongs to one socket: bytes of a closed connection are never served to the next one.
    """

    def __init__(self, client: object) -> None:
        self._client = client
        self._recv = client._sock_recv  # type: ignore[attr-defined]
        self._sock: object = None
        self._buf = b""
        self._pos = 0
        client._sock_recv = self.recv  # type: ignore[attr-defined]

    def _same_socket(self) -> bool:
        sock = self._client._sock  # type: ignore[attr-defined]
        if sock is not self._sock:
            self._sock, self._buf, self._pos = sock, b"", 0
            return False
        return True

    def recv(self, bufsize: int) -> bytes:
        if not self._same_socket() or self._pos >= len(self._buf):
            data = self._recv(RECV_CHUNK)        # raises BlockingIOError when there is nothing
            if len(data) <= bufsize:
                return data                       # includes b"" (EOF)
            self._buf, self._pos = data, 0
        chunk = self._buf[self._pos:self._pos + bufsize]
        self._pos += len(chunk)
        return chunk

    def pending(self) -> int:
        """Bytes received from the socket and not yet handed to paho."""
        if self._client._sock is not self._sock:  # type: ignore[attr-defined]
            return 0
        return len(self._buf) - self._pos

    def take_publish(self, v5: bool) -> tuple[bytes, bytes, int, bool, int, bool, Properties | None] | None:
        """The next buffered packet, decoded, if it is a whole, well-formed QoS 0/1 PUBLISH:
        ``(topic, payload, qos, retain, mid, dup, properties)``; else None, and paho reads it
        (any other packet, one not wholly buffered yet, anything odd: paho's own checks apply).

        paho's reader spends more on its per-packet bookkeeping (three reads, an ``_in_packet``
        dict, ``struct`` formats built per packet) than on the bytes: decoding a buffered
        PUBLISH here, with paho's own ``Properties`` for MQTT 5 properties, took the network
        thread from ~35% to ~15% of mqttd's CPU (py-spy). Only between packets: never while
        paho holds part of one."""
        client = self._client
        if client._in_packet["command"] != 0 or not self._same_socket():  # type: ignore[attr-defined]
            return None
        buf, pos = self._buf, self._pos
        end = len(buf)
        if end - pos < 2:
            return None
        header = buf[pos]
        if header & 0xF0 != 0x30 or header & 0x06 > 0x02:
            return None
        length, mult, i = 0, 1, pos + 1
        while True:                                  # remaining length: at most 4 bytes
            if i >= end or i - pos > 4:
                return None
            byte = buf[i]
            length += (byte & 127) * mult
            mult *= 128
            i += 1
            if not byte & 128:
                break
        stop = i + length
        if stop > end or length < 2:
            return None
        p = i + 2 + ((buf[i] << 8) | buf[i + 1])
        if p > stop or (not v5 and p == i + 2):      # an empty topic is a protocol error on 3.1.1
            return None
        topic = buf[i + 2:p]
        qos = (header >> 1) & 3
        mid = 0
        if qos:
            if p + 2 > stop:
                return None
            mid = (buf[p] << 8) | buf[p + 1]
            p += 2
        props = None
        if v5:
            if p >= stop:
                return None
            if buf[p] == 0:
                p += 1
            else:
                props = Properties(PacketTypes.PUBLISH)
                try:
                    _, used = props.unpack(buf[p:stop])
                except Exception:  # noqa: BLE001 - malformed: paho reads it and says so
                    return None
                p += used
                if p > stop:
                    return None
        self._pos = stop
        with client._msgtime_mutex:  # type: ignore[attr-defined]
            client._last_bytes_received = _time_func()  # type: ignore[attr-defined]  # as paho's reader does
        return topic, buf[p:stop], qos, bool(header & 1), mid, bool(header & 8), props


PublishHandler = Callable[[bytes, bytes, int, bool, int, bool, "Properties | None"], None]


def direct_publish(client: object, on_publish: PublishHandler) -> bool:
    """Hand every QoS 0/1 PUBLISH to ``on_publish(topic, payload, qos, retain, mid, dup, properties)``
    straight from paho's own decoder, on a client with manual acks.

    paho wraps each one in an ``MQTTMessage`` with an ``MQTTMessageInfo`` (a ``threading.Condition``
    each), formats a debug line and takes two mutexes before calling ``on_message``: ~20% of the
    network thread at 7k msg/s (py-spy). With manual acks paho does nothing else for QoS 0/1, so
    skipping the wrapper changes nothing on the wire. QoS 2 (never granted by mqttd's
    subscriptions) keeps paho's own flow. An exception in ``on_publish`` propagates exactly as one
    in ``on_message`` does with ``suppress_exceptions=False``. Returns False, changing nothing,
    if this paho is not laid out as expected; the caller then uses ``on_message``.
    """
    original = getattr(client, "_handle_publish", None)
    decode = getattr(_packet, "decode_publish", None)
    if original is None or decode is None or not getattr(client, "_manual_ack", False) \
            or not isinstance(getattr(client, "_in_packet", None), dict):
        return False
    ok = MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_publish() -> MQTTErrorCode:
        packet = client._in_packet  # type: ignore[attr-defined]
        header = packet["command"]
        if header & 0x06 == 0x04:
            return original()
        p = decode(header, packet["packet"], client._protocol)  # type: ignore[attr-defined]
        on_publish(p.topic, p.payload, p.qos, p.retain, p.mid, p.dup, p.properties)
        return ok

    client._handle_publish = _handle_publish  # type: ignore[attr-defined]
    return True
