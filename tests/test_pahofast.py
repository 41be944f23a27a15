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
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    sent: list[bytes] = []
    for proto in (paho.MQTTv311, paho.MQTTv5):
        one = paho.Client(CallbackAPIVersion.VERSION2, client_id="x", protocol=proto, manual_ack=True)
        many = paho.Client(CallbackAPIVersion.VERSION2, client_id="x", protocol=proto, manual_ack=True)
        for c in (one, many):
            c._packet_queue = lambda cmd, packet, mid, qos, info=None, _s=sent, _c=c: _s.append((id(_c), bytes(packet)))
        for mid in (1, 2, 300, 65535):
            one.ack(mid, 1)
        pahofast.ack_many(many, [1, 2, 300, 65535])
        singles = b"".join(p for who, p in sent if who == id(one))
        batched = [p for who, p in sent if who == id(many)]
        assert len(batched) == 1 and batched[0] == singles == bytes.fromhex("40020001400200024002012c4002ffff")
        sent.clear()
