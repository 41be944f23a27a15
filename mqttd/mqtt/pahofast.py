"""Measured speed-ups at the paho edge (only mqttd.mqtt imports this module).

Each was found with py-spy on scripts/bench and keeps paho's behaviour on the wire:
- ``apply``: shared constant tables in paho's ``Properties`` (built anew for every MQTT 5
  PUBLISH: 20-40% of mqttd's CPU at 10k msg/s);
- ``skip_filtered_callbacks``: no walk of an empty callback trie per message;
- ``ack_many``: a batch's PUBACKs and PUBRECs written as one buffer, in arrival order, byte for
  byte what paho would write;
- ``decode_publish``: one PUBLISH decoder of our own (``mqttd.mqtt.decode``, with the other
  pure decoders), decoding exactly what paho decodes;
- ``RecvBuffer``: the socket read 64 KiB at a time, and whole PUBLISH packets decoded from that
  buffer without paho's per-packet bookkeeping;
- ``direct_publish``: the PUBLISH packets paho does read go to the session without an
  ``MQTTMessage`` (and its ``threading.Condition``) each; QoS 2 included (PUBREC after commit,
  PUBCOMP at once on PUBREL: see ``direct_publish``).
Each is applied only if this paho has the layout it was written for, and tested against paho's
own decoding; otherwise paho is left as it is and everything still works, only slower.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from paho.mqtt.client import time_func as _time_func
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, Properties

from mqttd.mqtt.decode import Publish, decode_publish, decode_pubrel_mid, user_properties_only

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

    original_unpack = Properties.unpack

    def unpack(self: Properties, buffer: bytes) -> tuple[Properties, int]:
        # Properties that are only user properties (the gap-detection stamp, a traceparent):
        # decoded here, else by paho. paho scans every property name several times per property
        # (~90% of the daemon's CPU on stamped messages, measured: ~200 us a message against 2 us).
        decoded = user_properties_only(buffer)
        if decoded is None:
            return original_unpack(self, buffer)
        pairs, used = decoded
        self.clear()
        if pairs:
            self.__dict__["UserProperty"] = pairs
        return self, used

    __init__.__wrapped__ = original_init  # type: ignore[attr-defined]
    unpack.__wrapped__ = original_unpack  # type: ignore[attr-defined]
    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    Properties.unpack = unpack  # type: ignore[method-assign]
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
        client._on_message_filtered = _NoFilteredCallbacks()


_PUBACK, _PUBREC, _PUBREL, _PUBCOMP = 0x40, 0x50, 0x60, 0x70
_ACK_COMMAND = {1: _PUBACK, 2: _PUBREC}
_ack = struct.Struct("!BBH").pack


def ack_many(client: object, acks: list[tuple[int, int]]) -> None:
    """Queue the acks of a whole batch, ``(mid, qos)`` in arrival order, as one write: PUBACK
    (0x40) for QoS 1, PUBREC (0x50) for QoS 2 (each ``command, 2, mid``; the same on 3.1.1 and 5).

    paho's ``ack(mid, 1)`` queues each 4-byte PUBACK as its own packet, with a socketpair poke and
    a ``send()`` each: ~11% of CPU at 20k msg/s. The concatenation is byte-for-byte what paho's
    ``_send_puback``/``_send_pubrec`` would write, in the same order, through paho's own out-queue
    (so it never interleaves with a partly written packet, and MQTT §4.6's order holds). Falls
    back to paho's own senders, one by one, in the same order."""
    if not acks:
        return
    queue = getattr(client, "_packet_queue", None)
    if queue is None:
        for mid, qos in acks:
            if qos == 2:
                client._send_pubrec(mid)  # type: ignore[attr-defined]
            else:
                client.ack(mid, 1)  # type: ignore[attr-defined]
        return
    # The command recorded with the queued bytes only matters to paho for PUBLISH and DISCONNECT.
    queue(_PUBACK, b"".join([_ack(_ACK_COMMAND[qos], 2, mid) for mid, qos in acks]), 0, 1)


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

    def take_publish(self, v5: bool) -> Publish | None:
        """The next buffered packet, decoded, if it is a whole, well-formed PUBLISH of QoS 0, 1
        or 2: ``(topic, payload, qos, retain, mid, dup, properties)`` (``decode_publish``); else
        None, and paho reads it (any other packet, one not wholly buffered yet, anything odd:
        paho's reader and our ``_handle_publish`` say what is wrong with it).

        paho's reader spends more on its per-packet bookkeeping (three reads, an ``_in_packet``
        dict, ``struct`` formats built per packet) than on the bytes: decoding a buffered
        PUBLISH here took the network thread from ~35% to ~15% of mqttd's CPU (py-spy). Only
        between packets: never while paho holds part of one."""
        client = self._client
        if client._in_packet["command"] != 0 or not self._same_socket():  # type: ignore[attr-defined]
            return None
        buf, pos = self._buf, self._pos
        end = len(buf)
        if end - pos < 2:
            return None
        header = buf[pos]
        if header & 0xF0 != 0x30 or header & 0x06 == 0x06:
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
        if stop > end:
            return None
        try:
            packet = decode_publish(header, buf, i, stop, v5)
        except MalformedPacket:
            return None                              # paho reads it and says so
        self._pos = stop
        with client._msgtime_mutex:  # type: ignore[attr-defined]
            # as paho's reader does (2.2 names it _last_bytes_received, 2.1 _last_msg_in)
            if hasattr(client, "_last_bytes_received"):
                client._last_bytes_received = _time_func()
            else:
                client._last_msg_in = _time_func()  # type: ignore[attr-defined]
        return packet


PublishHandler = Callable[[bytes, bytes, int, bool, int, bool, "Properties | None"], None]


def direct_publish(client: object, on_publish: PublishHandler) -> bool:
    """Hand every PUBLISH (QoS 0, 1 and 2) to ``on_publish(topic, payload, qos, retain, mid, dup,
    properties)`` straight from our decoder, on a client with manual acks; answer every PUBREL
    with PUBCOMP at once.

    paho wraps each PUBLISH in an ``MQTTMessage`` with an ``MQTTMessageInfo`` (a
    ``threading.Condition`` each), formats a debug line and takes two mutexes before calling
    ``on_message``: ~20% of the network thread at 7k msg/s (py-spy). With manual acks paho does
    nothing else for QoS 0/1, so skipping the wrapper changes nothing on the wire.

    QoS 2 (messages queued in the session by an earlier QoS 2 subscription, or a broker that
    ignores the granted QoS) is taken like QoS 1: paho would PUBREC it at once (before commit),
    call ``on_message`` only at PUBREL, and with manual acks never PUBCOMP it, so each would hold
    an in-flight slot for ever. Here it goes to ``on_publish`` at once, the session sends its
    PUBREC after commit (``ack_many``), and the broker's PUBREL is answered with PUBCOMP at once,
    known mid or not (after a reconnect the broker may release a mid of an earlier connection;
    the message itself was committed before its PUBREC, so completing it loses nothing).

    A malformed PUBLISH or PUBREL is a protocol error (the connection is dropped and made
    again), as paho 2.2 has it; paho 2.1 would raise out of its reader. An exception in
    ``on_publish`` propagates exactly as one in ``on_message`` does with
    ``suppress_exceptions=False``. Returns False, changing nothing, if this paho is not laid out
    as expected; the caller then uses ``on_message``.
    """
    if getattr(client, "_handle_publish", None) is None or getattr(client, "_handle_pubrel", None) is None \
            or not callable(getattr(client, "_send_pubcomp", None)) or not getattr(client, "_manual_ack", False) \
            or not isinstance(getattr(client, "_in_packet", None), dict):
        return False
    ok = MQTTErrorCode.MQTT_ERR_SUCCESS
    protocol_error = MQTTErrorCode.MQTT_ERR_PROTOCOL
    v5 = int(client._protocol) == 5  # type: ignore[attr-defined]

    def _handle_publish() -> MQTTErrorCode:
        packet = client._in_packet  # type: ignore[attr-defined]
        try:
            p = decode_publish(packet["command"], packet["packet"], v5=v5)
        except MalformedPacket as exc:
            log.warning("malformed PUBLISH from the broker (%s): reconnecting", exc)
            return protocol_error
        if p[2] == 3:
            log.warning("PUBLISH with QoS 3 from the broker: reconnecting")
            return protocol_error
        on_publish(*p)
        return ok

    def _handle_pubrel() -> MQTTErrorCode:
        try:
            mid = decode_pubrel_mid(client._in_packet["packet"], v5)  # type: ignore[attr-defined]
        except MalformedPacket as exc:
            log.warning("malformed PUBREL from the broker (%s): reconnecting", exc)
            return protocol_error
        return client._send_pubcomp(mid)  # type: ignore[attr-defined]

    client._handle_publish = _handle_publish  # type: ignore[attr-defined]
    client._handle_pubrel = _handle_pubrel  # type: ignore[attr-defined]
    return True
