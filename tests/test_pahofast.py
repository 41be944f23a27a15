"""The shared-table Properties speed-up decodes exactly what paho decodes."""
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqttd.mqtt import pahofast


def _packed() -> bytes:
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = [("msg-id", "abc-1"), ("k", "v")]
    p.ContentType = "application/json"
    p.MessageExpiryInterval = 30
    return p.pack()


def test_decoding_after_the_speedup_gives_the_same_properties():
    raw = _packed()
    before = Properties(PacketTypes.PUBLISH)
    before.unpack(raw)
    assert pahofast.apply()
    after = Properties(PacketTypes.PUBLISH)
    after.unpack(raw)
    assert after.UserProperty == before.UserProperty == [("msg-id", "abc-1"), ("k", "v")]
    assert after.ContentType == "application/json" and after.MessageExpiryInterval == 30
    assert after.json() == before.json()
    after.unpack(Properties(PacketTypes.PUBLISH).pack())      # unpack clears old values
    assert not hasattr(after, "UserProperty") and after.json() == {}


def test_validation_still_applies_after_the_speedup():
    pahofast.apply()
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = 60
    p.ReceiveMaximum = 100
    try:
        p.ReceiveMaximum = 0
    except Exception as exc:  # paho raises MQTTException for out-of-range values
        assert "1-65535" in str(exc)
    else:
        raise AssertionError("out-of-range ReceiveMaximum was accepted")


def test_a_batch_of_acks_is_the_same_bytes_paho_would_send_one_by_one():
    """PUBACK for QoS 1, PUBREC for QoS 2, in the order given, as paho's own senders write them."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    sent: list[bytes] = []
    acks = [(1, 1), (2, 2), (300, 1), (65535, 2), (7, 1)]
    for proto in (paho.MQTTv311, paho.MQTTv5):
        one = paho.Client(CallbackAPIVersion.VERSION2, client_id="x", protocol=proto, manual_ack=True)
        many = paho.Client(CallbackAPIVersion.VERSION2, client_id="x", protocol=proto, manual_ack=True)
        for c in (one, many):
            c._packet_queue = lambda cmd, packet, mid, qos, info=None, _s=sent, _c=c: _s.append((id(_c), bytes(packet)))
        for mid, qos in acks:
            one.ack(mid, 1) if qos == 1 else one._send_pubrec(mid)
        pahofast.ack_many(many, acks)
        singles = b"".join(p for who, p in sent if who == id(one))
        batched = [p for who, p in sent if who == id(many)]
        assert len(batched) == 1
        assert batched[0] == singles == bytes.fromhex("40020001" "50020002" "4002012c" "5002ffff" "40020007")
        sent.clear()
        pahofast.ack_many(many, [(9, 2)])              # a batch of one is one packet too
        assert [p for who, p in sent if who == id(many)] == [bytes.fromhex("50020009")]
        sent.clear()


def _raw_publish(topic: bytes, payload: bytes, *, qos: int = 1, mid: int = 7, retain: bool = False,
                 dup: bool = False, props: bytes | None = b"\x00") -> bytes:
    """A PUBLISH as the broker writes it; ``props`` None for 3.1.1 (no property block)."""
    import struct

    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
    body += (props if props is not None else b"") + payload
    n, length = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return bytes([0x30 | (qos << 1) | (8 if dup else 0) | (1 if retain else 0)]) + length + body


def _publish_packet(topic: str, payload: bytes, mid: int, qos: int = 1, v5: bool = True) -> bytes:
    return _raw_publish(topic.encode(), payload, qos=qos, mid=mid, props=b"\x00" if v5 else None)


def _paho_client_on(sock):  # noqa: ANN001, ANN202
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="x", protocol=paho.MQTTv5, manual_ack=True)
    sock.setblocking(False)
    c._sock = sock
    return c


def test_the_receive_buffer_hands_paho_every_packet_of_a_chunk_in_order():
    import socket

    from paho.mqtt.enums import MQTTErrorCode

    broker_end, ours = socket.socketpair()
    try:
        c = _paho_client_on(ours)
        rbuf = pahofast.RecvBuffer(c)
        got: list[tuple] = []
        c.on_message = lambda client, userdata, m: got.append((m.topic, m.payload, m.mid))
        # a 70 kB payload spans two 64 KiB chunks; a 2-byte remaining length crosses a read
        packets = [_publish_packet(f"ble/d{i}/t", b"x" * (70_000 if i == 3 else i), i + 1) for i in range(200)]
        broker_end.sendall(b"".join(packets))
        while len(got) < 200:
            assert c.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert got == [(f"ble/d{i}/t", b"x" * (70_000 if i == 3 else i), i + 1) for i in range(200)]
        assert rbuf.pending() == 0
    finally:
        broker_end.close()
        ours.close()


def test_bytes_buffered_from_a_closed_connection_never_reach_the_next_one():
    import socket

    old_broker, old = socket.socketpair()
    new_broker, new = socket.socketpair()
    try:
        c = _paho_client_on(old)
        rbuf = pahofast.RecvBuffer(c)
        got: list[int] = []
        c.on_message = lambda client, userdata, m: got.append(m.mid)
        old_broker.sendall(_publish_packet("a", b"1", 1) + _publish_packet("a", b"2", 2))
        c.loop_read()                        # reads both, hands paho the first
        assert got == [1] and rbuf.pending() > 0
        new.setblocking(False)
        c._sock = new                        # what a reconnect does
        assert rbuf.pending() == 0           # mid 2 of the old connection is gone
        new_broker.sendall(_publish_packet("a", b"3", 1))
        c.loop_read()
        assert got == [1, 1] and rbuf.pending() == 0
    finally:
        for s in (old_broker, old, new_broker, new):
            s.close()


def test_direct_publish_delivers_what_on_message_would_and_takes_qos_2_like_qos_1():
    import socket

    broker_end, ours = socket.socketpair()
    try:
        plain = _paho_client_on(ours)
        seen: list[tuple] = []
        plain.on_message = lambda client, userdata, m: seen.append(
            (m._topic, m.payload, m.qos, m.retain, m.mid, m.dup, m.properties.json()))
        direct: list[tuple] = []
        fast = _paho_client_on(ours)
        assert pahofast.direct_publish(fast, lambda t, p, q, r, mid, dup, props: direct.append(
            (t, p, q, r, mid, dup, props.json() if props is not None else {})))
        for client in (plain, fast):
            for raw in (_publish_packet("ble/é/t", b'{"a":1}', 7), _publish_packet("q0", b"", 0, qos=0)):
                broker_end.sendall(raw)
                client.loop_read()
        assert direct == seen and [d[4] for d in direct] == [7, 0]
        broker_end.setblocking(False)
        # QoS 2: delivered at once, and no PUBREC before the session acks it (after commit)
        broker_end.sendall(_publish_packet("q2", b"z", 9, qos=2))
        fast.loop_read()
        fast.loop_write()
        assert direct[2][:5] == (b"q2", b"z", 2, False, 9) and not fast._in_messages
        try:
            written = broker_end.recv(100)
        except BlockingIOError:
            written = b""
        assert written == b""
        # the broker's PUBREL (of this mid or one we never saw) is answered with PUBCOMP at once
        broker_end.sendall(bytes.fromhex("62020009") + bytes.fromhex("6203abcd00"))
        for _ in range(2):
            fast.loop_read()
        fast.loop_write()
        assert broker_end.recv(100) == bytes.fromhex("70020009" "7002abcd")
    finally:
        broker_end.close()
        ours.close()


def test_a_full_intake_still_reads_a_packet_per_quarter_keepalive_when_all_of_them_are_buffered():
    """While the intake is full the session reads one packet every keepalive/4, so that paho
    sees bytes arriving and does not give up on its PINGREQ. When everything the broker sent is
    already in the receive buffer, the socket is not readable: that read must still happen."""
    import socket
    import time

    from paho.mqtt.enums import MQTTErrorCode

    from mqttd.config import BrokerConfig
    from mqttd.mqtt.session import Session

    class ListIntake(list):
        def put(self, msg):  # noqa: ANN001
            self.append(msg.topic)

    got = ListIntake()
    # an intake of one message that is never taken: full after the first
    s = Session(BrokerConfig(keepalive=5), "bnp-test", [("ble/#", 1)], got, max_backlog=1,
                status_topic="mqttd/bnp/status")
    now = [1000.0]
    s.reader.clock = lambda: now[0]                    # the reader's clock: time passes when the test says
    broker_end, ours = socket.socketpair()
    try:
        ours.setblocking(False)
        s._client._sock = ours                         # paho's socket: the test plays the broker
        broker_end.sendall(b"".join(_publish_packet(f"ble/{i}", b"x", i + 1) for i in range(3)))
        assert s.reader.step(stop_reading=False) == MQTTErrorCode.MQTT_ERR_SUCCESS and got == ["ble/0"]
        assert s.reader.rbuf.pending() > 0             # one recv took all three: the socket is empty
        before = len(got)
        s.reader.waker.poke()                          # (so that the paused wait returns at once)
        t0 = time.monotonic()
        s.reader.step(stop_reading=False)              # the pause begins: nothing read
        assert len(got) == before and s.reader.paused and time.monotonic() - t0 < 0.5
        now[0] += 2                                    # a quarter keepalive (1.25 s) has passed
        s.reader.step(stop_reading=False)
        assert len(got) == before + 1                  # one packet, from the buffer
    finally:
        broker_end.close()
        ours.close()


def _props_bytes(**values) -> bytes:  # noqa: ANN003
    p = Properties(PacketTypes.PUBLISH)
    for k, v in values.items():
        setattr(p, k, v)
    return p.pack()


class _BufferedClient:
    """Just what RecvBuffer.take_publish touches on a paho client."""

    def __init__(self, data: bytes) -> None:
        import threading

        self._sock = object()
        self._in_packet = {"command": 0}
        self._msgtime_mutex = threading.Lock()
        self._last_bytes_received = 0.0
        self._sock_recv = lambda n: b""
        self.rbuf = pahofast.RecvBuffer(self)
        self.rbuf._same_socket()
        self.rbuf._buf = data


def test_publish_packets_decoded_from_the_buffer_are_what_paho_decodes():
    import pytest

    _packet = pytest.importorskip("paho.mqtt._packet")        # paho 2.1 has no decoder of its own
    from paho.mqtt.enums import MQTTProtocolVersion

    cases = []
    for v5 in (True, False):
        for topic in (b"ble/dev-1/telemetry", "ble/é/ü".encode(), b"t" * 300, b"" if v5 else b"x"):
            for size in (0, 1, 120, 16_380, 70_000):            # remaining length of 1, 2 and 3 bytes
                for qos in (0, 1, 2):
                    props = [None] if not v5 else [b"\x00", _props_bytes(UserProperty=[("msg-id", "a-1")],
                                                                          ContentType="application/json")]
                    for pr in props:
                        cases.append((v5, _raw_publish(topic, bytes([size % 251]) * size, qos=qos, mid=qos * 513,
                                                       retain=size % 2 == 1, dup=qos == 1 and size == 1, props=pr)))
    for v5, raw in cases:
        c = _BufferedClient(raw)
        got = c.rbuf.take_publish(v5)
        assert got is not None and c.rbuf.pending() == 0 and c._last_bytes_received > 0
        header_len = 1 + next(i for i in range(1, 5) if not raw[i] & 0x80)
        want = _packet.decode_publish(raw[0], raw[header_len:],
                                      MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311)
        topic, payload, qos, retain, mid, dup, props = got
        assert (topic, payload, qos, retain, mid, dup) == (want.topic, want.payload, want.qos, want.retain,
                                                           want.mid, want.dup)
        assert (props.json() if props is not None else {}) == (want.properties.json() if v5 else {})


def test_anything_but_a_whole_well_formed_publish_is_left_to_paho():
    raw = _raw_publish(b"ble/x", b"{}", qos=1)
    for cut in range(len(raw)):                       # not wholly buffered yet
        c = _BufferedClient(raw[:cut])
        assert c.rbuf.take_publish(True) is None and c.rbuf.pending() == cut
    others = [(bytes.fromhex("40020001"), True),                  # PUBACK
              (bytes.fromhex("d000"), True),                      # PINGRESP
              (_raw_publish(b"q3", b"z", qos=3), True),           # QoS 3: a protocol error
              (_raw_publish(b"", b"z", props=None), False),       # empty topic on 3.1.1: a protocol error
              (_raw_publish(b"t", b"z", props=b"\x05\x01"), True),  # properties longer than the packet
              (bytes([0x32, 0x80, 0x80, 0x80, 0x80, 0x01]), True)]   # a 5-byte remaining length
    for raw, v5 in others:
        c = _BufferedClient(raw)
        assert c.rbuf.take_publish(v5) is None and c.rbuf.pending() == len(raw), raw
    c = _BufferedClient(_raw_publish(b"ble/x", b"{}"))
    c._in_packet["command"] = 0x32                     # paho holds part of a packet: never interleave
    assert c.rbuf.take_publish(True) is None


def test_two_packets_in_one_chunk_come_out_in_order_and_the_next_socket_starts_clean():
    c = _BufferedClient(_raw_publish(b"a", b"1", mid=1) + _raw_publish(b"b", b"2", mid=2))
    assert c.rbuf.take_publish(True)[4] == 1
    c._sock = object()                                 # a reconnect: the rest belongs to the old one
    assert c.rbuf.take_publish(True) is None and c.rbuf.pending() == 0


def test_qos_2_packets_are_taken_from_the_buffer_too():
    c = _BufferedClient(_raw_publish(b"q2", b"z", qos=2, mid=513, dup=True))
    assert c.rbuf.take_publish(True) == (b"q2", b"z", 2, False, 513, True, None)
    assert c.rbuf.pending() == 0


def test_pahofast_works_on_a_paho_without_its_private_packet_module(tmp_path):
    """paho 2.1 (which pyproject allows) has no paho.mqtt._packet: pahofast must not need it."""
    import subprocess
    import sys

    code = (
        "import sys, paho.mqtt.client\n"
        "sys.modules['paho.mqtt._packet'] = None\n"          # any import of it now fails
        "import paho.mqtt as pm\n"
        "pm.__dict__.pop('_packet', None)\n"
        "from mqttd.mqtt import decode, pahofast\n"
        "raw = bytes.fromhex('0005') + b'ble/x' + bytes.fromhex('000700') + b'{}'\n"
        "print(decode.decode_publish(0x32, raw, v5=True)[:6])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(b'ble/x', b'{}', 1, False, 7, False)"


def test_properties_that_are_only_user_properties_decode_as_paho_decodes_them():
    # The gap-detection stamp (and a traceparent) are decoded without paho's name scans; every
    # other buffer, and a malformed one, still goes to paho (the same values, the same errors).
    from paho.mqtt.properties import MalformedPacket, VariableByteIntegers

    from mqttd.mqtt.stamp import Stamp

    def props(pairs: list[tuple[str, str]]) -> bytes:
        p = Properties(PacketTypes.PUBLISH)
        if pairs:
            p.UserProperty = pairs
        return p.pack()

    def raw(body: bytes) -> bytes:
        return bytes(VariableByteIntegers.encode(len(body))) + body

    cases = [Stamp.of("web-pub-h-1-ab", 7).pack(), props([("traceparent", "00-ab-cd-01"), ("é", "ü" * 300)]),
             props([]), _packed(), props([("k", "v")]) + b"trailing bytes are not properties"]
    assert pahofast.apply()
    pahos = Properties.unpack.__wrapped__            # paho's own, kept by apply()
    for buffer in cases:
        ours, theirs = Properties(PacketTypes.PUBLISH), Properties(PacketTypes.PUBLISH)
        assert ours.unpack(buffer)[1] == pahos(theirs, buffer)[1]
        assert ours.json() == theirs.json() and vars(ours).keys() == vars(theirs).keys()
    p = Properties(PacketTypes.PUBLISH)
    p.unpack(cases[0])
    assert p.UserProperty == [("mqttd-pub", "web-pub-h-1-ab"), ("mqttd-seq", "7")]
    # NUL in a name and an encoded surrogate: paho's own MalformedPacket, as before
    for bad in (raw(b"\x26\x00\x01\x00\x00\x01v"), raw(b"\x26\x00\x03\xed\xa0\x80\x00\x01v")):
        try:
            Properties(PacketTypes.PUBLISH).unpack(bad)
        except (MalformedPacket, UnicodeDecodeError):
            pass
        else:
            raise AssertionError(f"{bad!r} was accepted")
