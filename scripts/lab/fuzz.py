"""The receive-path fuzzer's generators and checks (hypothesis strategies of MQTT streams, and
the comparison of mqttd's reader and PUBLISH decoder with paho's own on the same bytes), shared by
tests/test_receive_fuzz.py and scripts/fuzz_receive. Needs paho 2.2's ``paho.mqtt._packet``, the
reference decoder (the test skips without it)."""
from __future__ import annotations

import collections
import socket
import struct

import paho.mqtt._packet as _packet
import paho.mqtt.client as paho
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, Properties

from mqttd.mqtt import decode, pahofast

def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n % 128, n // 128
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def frame(header: int, body: bytes) -> bytes:
    return bytes([header]) + _varint(len(body)) + body


# ---- strategies ------------------------------------------------------------------------------------

def _props(**values) -> bytes:  # noqa: ANN003
    p = Properties(PacketTypes.PUBLISH)
    for k, v in values.items():
        setattr(p, k, v)
    return p.pack()


PROPERTY_BLOCKS = st.one_of(
    st.just(b"\x00"),
    st.just(_props(UserProperty=[("msg-id", "a-1")], ContentType="application/json")),
    st.just(_props(MessageExpiryInterval=30, CorrelationData=b"\x00\xff", SubscriptionIdentifier=7)),
    st.just(_props(UserProperty=[("k", "v"), ("k", "w")], PayloadFormatIndicator=1, TopicAlias=3)),
    st.binary(max_size=12).map(lambda b: _varint(len(b)) + b),          # a random property list
    st.binary(max_size=8),                                              # anything at all
)


@st.composite
def publishes(draw) -> tuple[int, bytes]:  # noqa: ANN001
    """A PUBLISH (fixed-header byte, body), well formed as a broker writes it, for 5 or 3.1.1."""
    v5 = draw(st.booleans())
    qos = draw(st.sampled_from([0, 1, 2, 2, 3]))
    topic = draw(st.one_of(st.just(b"ble/dev-1/telemetry"), st.binary(max_size=20),
                           st.text(max_size=10).map(str.encode)))
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", draw(st.integers(0, 65535)))
    if v5:
        body += draw(PROPERTY_BLOCKS)
    body += draw(st.one_of(st.binary(max_size=40), st.just(b"x" * 70_000)))
    header = 0x30 | qos << 1 | draw(st.integers(0, 1)) << 3 | draw(st.integers(0, 1))
    return header, body


@st.composite
def mutated(draw) -> tuple[int, bytes]:  # noqa: ANN001
    header, body = draw(publishes())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "grow", "flags", "topic-length"]))
        if kind == "flip" and body:
            i = draw(st.integers(0, len(body) - 1))
            body = body[:i] + bytes([draw(st.integers(0, 255))]) + body[i + 1:]
        elif kind == "cut":
            body = body[:draw(st.integers(0, len(body)))]
        elif kind == "grow":
            body += draw(st.binary(min_size=1, max_size=5))
        elif kind == "flags":
            header = 0x30 | draw(st.integers(0, 15))
        elif kind == "topic-length" and len(body) >= 2:         # anywhere, or just about the end
            near_end = min(65535, len(body))
            n = draw(st.one_of(st.integers(0, 65535), st.integers(max(0, near_end - 4), near_end)))
            body = struct.pack("!H", n) + body[2:]
    return header, body


def _mid() -> st.SearchStrategy[bytes]:
    return st.integers(0, 65535).map(lambda m: struct.pack("!H", m))


OTHERS = st.one_of(
    st.just((0xD0, b"")),                                                    # PINGRESP
    st.tuples(st.just(0x40), _mid()),                                        # PUBACK
    st.tuples(st.just(0x70), _mid()),                                        # PUBCOMP
    st.tuples(st.just(0x50), _mid()),                                        # PUBREC
    st.tuples(st.just(0x62), _mid()),                                        # PUBREL
    st.tuples(st.just(0x62), st.tuples(_mid(), st.sampled_from([b"\x00", b"\x92", b"\x00\x00", b"\x7f",
                                                                b"\x92\x03\x1f\x00\x00"]))
              .map(b"".join)),                                               # PUBREL with reason/properties
    st.tuples(st.sampled_from([0x62, 0x40, 0xD0]), st.binary(max_size=6)),   # malformed acks
)

PACKETS = st.lists(st.one_of(publishes(), publishes(), mutated(), OTHERS), min_size=1, max_size=12)


@st.composite
def streams(draw) -> tuple[bytes, list[int]]:  # noqa: ANN001
    """Framed packets, maybe a garbage tail or a remaining length over 4 bytes, and read cut points."""
    framed = [frame(h, b) for h, b in draw(PACKETS)]
    ends = [sum(map(len, framed[:i + 1])) for i in range(len(framed))]
    data = b"".join(framed)
    tail = draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=12),
                          st.just(bytes([0x32, 0x80, 0x80, 0x80, 0x80, 0x01]))))
    data += tail
    # anywhere, and just before or after a packet's end (a packet short of its last byte or two)
    near_an_end = st.tuples(st.sampled_from(ends), st.integers(-3, 2)).map(lambda e: e[0] + e[1])
    cuts = draw(st.lists(st.one_of(st.integers(0, len(data)), near_an_end), max_size=8))
    return data, sorted({c for c in cuts if 0 <= c <= len(data)})


# ---- the two readers ---------------------------------------------------------------------------------

def _norm(topic, payload, qos, retain, mid, dup, props) -> tuple:  # noqa: ANN001
    return bytes(topic), bytes(payload), qos, bool(retain), mid, bool(dup), props.json() if props is not None else {}


class _Recorded(collections.OrderedDict):
    """paho's ``_in_messages``: records each QoS 2 message as paho takes it in (it calls
    ``on_message`` only at PUBREL)."""

    def __init__(self, got: list) -> None:
        super().__init__()
        self.got = got

    def __setitem__(self, mid, m) -> None:  # noqa: ANN001
        self.got.append(_norm(m._topic, m.payload, m.qos, m.retain, m.mid, m.dup, m.properties))
        super().__setitem__(mid, m)


class _Stop(Exception):
    pass


def read(stream: bytes, cuts: list[int], v5: bool, ours: bool) -> tuple[list[tuple], object]:
    """Feed ``stream`` to a client in pieces (split at ``cuts``) and read after each piece as
    the session does. Returns (messages in order, how it ended: None, an error code, or the name
    of an exception that escaped)."""
    broker, mine = socket.socketpair()
    got: list[tuple] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="fuzz", protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                    manual_ack=True)
    mine.setblocking(False)
    c._sock = mine
    rbuf = None
    if ours:
        rbuf = pahofast.RecvBuffer(c)
        assert pahofast.direct_publish(c, lambda *p: got.append(_norm(*p)))
    else:
        c.on_message = lambda client, userdata, m: got.append(
            _norm(m._topic, m.payload, m.qos, m.retain, m.mid, m.dup, m.properties)) if m.qos < 2 else None
        c._in_messages = _Recorded(got)
    outcome: object = None

    def pump() -> None:
        """Read what the socket holds, as the session does, until paho says there is no more."""
        nonlocal outcome
        while True:
            if rbuf is not None and rbuf.pending():
                before = rbuf.pending()
                packet = rbuf.take_publish(v5)
                if packet is not None:
                    assert rbuf.pending() < before, "a packet taken without consuming its bytes"
                    got.append(_norm(*packet))
                    continue
            rc = c._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                return
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                outcome = rc
                raise _Stop

    broker.setblocking(False)
    bounds = [0, *cuts, len(stream)]
    try:
        for start, stop in zip(bounds, bounds[1:]):
            piece = memoryview(stream)[start:stop]
            while True:            # a piece larger than the socket's buffer goes in as it is read
                try:
                    piece = piece[broker.send(piece[:65536]):] if piece else piece
                except BlockingIOError:
                    pass
                pump()
                try:
                    broker.recv(1 << 20)       # what the client wrote (PUBCOMP, PUBREL): not examined here
                except BlockingIOError:
                    pass
                if not piece:
                    break
        for _ in range(3):                     # paho stops after 100 reads of one packet: go on
            pump()
    except _Stop:
        pass
    except Exception as exc:  # noqa: BLE001 - what escapes is the finding
        outcome = type(exc).__name__
    finally:
        broker.close()
        mine.close()
    return got, outcome


def check_stream(stream: bytes, cuts: list[int], v5: bool) -> None:
    want = read(stream, cuts, v5, ours=False)
    got = read(stream, cuts, v5, ours=True)
    assert got == want
    assert not isinstance(got[1], str), f"{got[1]} escaped (paho raised it too)"


def check_decoder(header: int, body: bytes, v5: bool) -> None:
    """Ours and paho's decoder: the same fields, or both refuse the packet as malformed."""
    proto = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    try:
        p = _packet.decode_publish(header, bytearray(body), proto)
        want: object = _norm(p.topic, p.payload, p.qos, p.retain, p.mid, p.dup, p.properties)
    except MalformedPacket:
        want = MalformedPacket
    try:
        got: object = _norm(*decode.decode_publish(header, bytearray(body), v5=v5))
    except MalformedPacket:
        got = MalformedPacket
    assert got == want
    # the same from a window of a larger buffer (how RecvBuffer calls it): never a byte outside
    for pad in (b"\x00", b"\xff\xee\x01"):
        try:
            got = _norm(*decode.decode_publish(header, pad + body + pad, len(pad), len(pad) + len(body), v5))
        except MalformedPacket:
            got = MalformedPacket
        assert got == want, pad
