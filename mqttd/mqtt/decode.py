"""The pure decoders of MQTT packets the daemon reads: bytes in, values out, nothing patched.

- ``decode_publish``: a PUBLISH's variable header and payload, field for field what paho decodes
  (paho's private ``paho.mqtt._packet`` is not in every paho this supports: 2.1 has none);
- ``decode_pubrel_mid``: a PUBREL's packet id, validated as paho validates it;
- ``user_properties_only``: an MQTT 5 property block that holds only user properties, decoded
  without paho's per-property name scans.

``mqttd.mqtt.pahofast`` installs these in paho (the receive buffer, the direct PUBLISH path, the
shared ``Properties`` tables); this module knows nothing of paho's client.
"""
from __future__ import annotations

import struct

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, MQTTException, Properties
from paho.mqtt.reasoncodes import ReasonCode


def user_properties_only(buffer: bytes) -> tuple[list[tuple[str, str]], int] | None:
    """The ``(name, value)`` pairs and the bytes used, when the properties in ``buffer`` are all
    well-formed user properties (0x26); None for anything else (paho decodes it, or raises what
    it raises). Strict UTF-8 refuses the surrogates D800-DFFF, as paho's ``readUTF`` does, and
    NUL and U+FEFF are left to paho too."""
    n, shift, pos = 0, 0, 0
    while True:                              # the Variable Byte Integer: properties length
        if pos >= len(buffer) or pos == 4:
            return None
        byte = buffer[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    end = pos + n
    if end > len(buffer):
        return None
    pairs: list[tuple[str, str]] = []
    while pos < end:
        if buffer[pos] != 0x26:
            return None
        pos += 1
        pair: list[str] = []
        for _ in (0, 1):
            if pos + 2 > end:
                return None
            length = (buffer[pos] << 8) | buffer[pos + 1]
            if pos + 2 + length > end:
                return None
            try:
                text = bytes(buffer[pos + 2:pos + 2 + length]).decode("utf-8")
            except UnicodeDecodeError:
                return None
            if "\x00" in text or "\ufeff" in text:
                return None
            pair.append(text)
            pos += 2 + length
        pairs.append((pair[0], pair[1]))
    return pairs, end


# What decoding a PUBLISH can raise inside paho (its own ``_packet.DECODE_ERRORS``): all of them
# mean a malformed packet.
DECODE_ERRORS = (struct.error, IndexError, KeyError, ValueError, MQTTException)

Publish = tuple[bytes, bytes, int, bool, int, bool, "Properties | None"]


def decode_publish(header: int, buf: bytes | bytearray, start: int = 0, stop: int | None = None,
                   v5: bool = True) -> Publish:
    """Decode the PUBLISH whose variable header and payload are ``buf[start:stop]`` (everything
    after the fixed header): ``(topic, payload, qos, retain, mid, dup, properties)``.

    Exactly what paho decodes (``paho.mqtt._packet.decode_publish`` in 2.2, the inline decoder
    of 2.1's ``_handle_publish``), field for field; ``properties`` is None on 3.1.1 and for an
    empty MQTT 5 property block (paho gives an empty ``Properties`` there). Raises
    ``MalformedPacket`` where paho raises or finds a protocol error; QoS 3 is decoded as paho
    does (its handler refuses it, and so do ours)."""
    if stop is None:
        stop = len(buf)
    try:
        if stop - start < 2:
            raise MalformedPacket("PUBLISH too short for its topic length")
        p = start + 2 + ((buf[start] << 8) | buf[start + 1])
        if p > stop:
            raise MalformedPacket("PUBLISH topic longer than the packet")
        if p == start + 2 and not v5:
            raise MalformedPacket("topic can't be empty in MQTTv3")
        topic = bytes(buf[start + 2:p])
        qos = (header >> 1) & 3
        mid = 0
        if qos:
            if p + 2 > stop:
                raise MalformedPacket("PUBLISH too short for its packet id")
            mid = (buf[p] << 8) | buf[p + 1]
            p += 2
        props = None
        if v5:
            if p < stop and buf[p] == 0:
                p += 1                       # no properties (the usual case): no Properties object
            else:
                props = Properties(PacketTypes.PUBLISH)
                p += props.unpack(bytes(buf[p:stop]))[1]
        return topic, bytes(buf[p:stop]), qos, bool(header & 1), mid, bool(header & 8), props
    except MalformedPacket:
        raise
    except DECODE_ERRORS as exc:
        raise MalformedPacket(str(exc)) from exc


def decode_pubrel_mid(buf: bytes | bytearray, v5: bool) -> int:
    """The packet id of a PUBREL (everything after its fixed header), validated as paho does:
    2 bytes on 3.1.1; on 5 at least 2, then an optional reason code and properties. Raises
    ``MalformedPacket``."""
    try:
        n = len(buf)
        if n < 2 or (n != 2 and not v5):
            raise MalformedPacket("wrong size of PUBREL")
        if n > 2:
            ReasonCode(PacketTypes.PUBREL).unpack(buf[2:])
            if n > 3:
                Properties(PacketTypes.PUBREL).unpack(buf[3:])
        return (buf[0] << 8) | buf[1]
    except MalformedPacket:
        raise
    except DECODE_ERRORS as exc:
        raise MalformedPacket(str(exc)) from exc
