"""Typed payloads (docs/handlers.md "Typed payloads") and the JSON decoders behind
`Message.json()`.

The unit tests hold the decoders to the standard library's results and errors and the validators
to one error format; the daemon tests run the sample tenant's typed handlers (sensors/
typed_handlers.py, with TENANT_TYPED=1) against a real mosquitto on SQLite and PostgreSQL.
"""
import json
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import pydantic
import pytest
from lab.daemon import write_config
from lab.publish import Publisher, telemetry

from mqttd.errors import ConfigError
from mqttd.ingest.typed import decoder, payload_param
from mqttd.message import Message, PayloadError, json_backends
from mqttd.router import Route
from mqttd.topics import TopicFilter

# Payloads on which JSON decoders are known to differ: NaN and infinities, integers past 64 bits,
# lone surrogates, a byte order mark, UTF-16, control characters, trailing commas, deep nesting.
CORPUS = [
    b'{"seq": 1, "rssi": -40, "temp": 21.5}', b"[]", b"{}", b'""', b"0", b"-0", b"-0.0", b"1.0", b"1E2", b"1e-7",
    b"0.1", b"123456789.123456789", b"18446744073709551615", b"18446744073709551616",
    b"-9223372036854775809", b"123456789012345678901234567890", b'{"big": 99999999999999999999999}', b"1e400",
    b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"[NaN]", b'"\\ud800"', b'"\\ud83d\\ude00"', b'"\xf0\x9f\x98\x80"',
    b'\xef\xbb\xbf{"a": 1}', '{"a": 1}'.encode("utf-16"), b'"\xff"', b'"a\x01b"', b"[1,]", b'{"a":1,}', b"",
    b" ", b"nul", b"[1] [2]", b'{"a": 1, "a": 2}', b' \n\t[1 , 2]\n', b"[" * 5000 + b"]" * 5000, b'{"a": "\\u0000"}',
    b"true", b"false", b"null", b'"\\/"', b"01", b"+1", b".5", b"1.", b'{"a" 1}', b"\x00",
]


def _outcome(loads, data):
    try:
        return ("ok", repr(loads(data)))
    except Exception as exc:  # noqa: BLE001
        return ("error", type(exc).__name__, str(exc))


def test_every_json_backend_gives_the_standard_librarys_results_and_errors():
    backends = json_backends()
    assert set(backends) == {"msgspec", "orjson", "stdlib"}     # the test extra installs both
    for data in CORPUS:
        expected = _outcome(backends["stdlib"], data)
        for name, loads in backends.items():
            assert _outcome(loads, data) == expected, (name, data[:60])


def test_msg_json_raises_one_clear_error_whatever_the_backend():
    msg = Message("ble/d1/telemetry", b"{not json")
    with pytest.raises(PayloadError, match=r"^payload on ble/d1/telemetry is not valid JSON: Expecting property name"):
        msg.json()
    with pytest.raises(PayloadError, match="is not valid JSON: maximum recursion depth"):
        Message("t", b"[" * 100_000).json()


@dataclass
class Inner:
    fw: str


@dataclass
class Telemetry:
    seq: int
    rssi: int
    temp: float
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    inner: Inner | None = None


BAD = [
    (b'{"seq": 1, "rssi": "x", "temp": 1}', "$.rssi: expected int, got str"),
    (b'{"seq": 1, "rssi": true, "temp": 1}', "$.rssi: expected int, got bool"),
    (b'{"seq": 1, "rssi": 1.5, "temp": 1}', "$.rssi: expected int, got float"),
    (b'{"seq": 1, "temp": 1}', "$.rssi: required field missing"),
    (b'{"seq": 1, "rssi": 1, "temp": "warm"}', "$.temp: expected float, got str"),
    (b'{"seq": 1, "rssi": 1, "temp": 1, "tags": ["a", 2]}', "$.tags[1]: expected str, got int"),
    (b'{"seq": 1, "rssi": 1, "temp": 1, "inner": {"fw": 3}}', "$.inner.fw: expected str, got int"),
    (b'{"seq": 1, "rssi": 1, "temp": 1, "inner": 5}', "$.inner: expected object | null, got int"),
    (b"[1, 2]", "$: expected object, got array"),
]


@pytest.mark.parametrize("use_msgspec", [True, False], ids=["msgspec", "stdlib-checker"])
def test_a_dataclass_payload_is_validated_with_the_same_results_and_errors_with_or_without_msgspec(use_msgspec):
    decode, kind = decoder(Telemetry, use_msgspec=use_msgspec)
    assert kind == ("dataclass Telemetry (msgspec)" if use_msgspec else "dataclass Telemetry")
    good = decode(Message("t", b'{"seq": 1, "rssi": -40, "temp": 21, "extra": 1, "inner": {"fw": "1.2"}}'))
    assert good == Telemetry(1, -40, 21.0, inner=Inner("1.2")) and type(good.temp) is float
    for payload, reason in BAD:
        with pytest.raises(PayloadError) as err:
            decode(Message("ble/d1/telemetry", payload))
        assert str(err.value) == f"payload on ble/d1/telemetry: {reason}", payload
    with pytest.raises(PayloadError, match="is not valid JSON"):
        decode(Message("t", b"{not json"))
    # What only the standard library reads (a byte order mark, NaN) is read as msg.json() reads it.
    assert decode(Message("t", b'\xef\xbb\xbf{"seq": 1, "rssi": 2, "temp": NaN}')).seq == 1


def test_msgspec_structs_and_pydantic_models_name_the_field_path_too():
    class S(msgspec.Struct):
        rssi: int

    class P(pydantic.BaseModel):
        rssi: int
        tags: list[int] = []

    decode_s, _ = decoder(S)
    decode_p, kind = decoder(P)
    assert kind == "pydantic model P"
    assert decode_s(Message("t", b'{"rssi": 3}')) == S(3)
    assert decode_p(Message("t", b'{"rssi": "3"}')) == P(rssi=3)          # pydantic's own (lax) rules
    with pytest.raises(PayloadError, match=r"^payload on t: \$.rssi: expected int, got str$"):
        decode_s(Message("t", b'{"rssi": "x"}'))
    with pytest.raises(PayloadError, match=r"^payload on t: \$.tags\[1\]: input should be a valid integer"):
        decode_p(Message("t", b'{"rssi": 1, "tags": [1, "x"]}'))
    with pytest.raises(PayloadError, match="is not valid JSON: Expecting value"):
        decode_p(Message("t", b"[1,"))


def test_annotations_are_resolved_once_at_registration_into_the_call():
    seen = []

    def handler(msg: Message, device: str, data: Telemetry) -> None:
        seen.append((device, data))

    def many(msgs: list[Message], data: list[Telemetry]) -> None:
        seen.append([d.seq for d in data])

    payload = payload_param(handler, False, "handler", frozenset({"device"}))
    assert payload is not None and payload.param == "data"
    route = Route(TopicFilter.parse("ble/{device}/t"), handler, payload=payload)
    route.invoke([Message("ble/d1/t", b'{"seq": 1, "rssi": 2, "temp": 3}', params={"device": "d1"})])
    assert seen[-1] == ("d1", Telemetry(1, 2, 3.0))
    batch = Route(TopicFilter.parse("b/+"), many, batch=True, payload=payload_param(many, True, "many"))
    batch.invoke([Message("b/1", b'{"seq": 5, "rssi": 2, "temp": 3}'), Message("b/2", b'{"seq": 6, "rssi": 2, "temp": 3}')])
    assert seen[-1] == [5, 6]
    assert payload_param(lambda msg, device: None, False, "untyped") is None


def test_a_handler_whose_typed_parameter_cannot_be_used_is_refused_at_registration():
    def two(msg: Message, a: Telemetry, b: Telemetry) -> None: ...

    def not_a_list(msgs: list[Message], data: Telemetry) -> None: ...

    def unresolvable(msg: Message, data: "NoSuchType") -> None: ...  # noqa: F821

    with pytest.raises(ConfigError, match="more than one typed payload parameter"):
        payload_param(two, False, "two")
    with pytest.raises(ConfigError, match=r"annotate data as list\[Telemetry\]"):
        payload_param(not_a_list, True, "not_a_list")
    with pytest.raises(ConfigError, match="cannot resolve the annotation of data"):
        payload_param(unresolvable, False, "unresolvable")


def test_an_unresolvable_annotation_mqttd_does_not_fill_is_ignored_as_before():
    def handler(msg: "Msg", device: "DeviceId", when: "Clock" = None) -> None: ...  # noqa: F821

    assert payload_param(handler, False, "handler", frozenset({"device"})) is None


# ---- the daemon ---------------------------------------------------------------------------------------
def _run_typed(host, broker, db, tmp_path, items):
    """Queue ``items`` for a stopped daemon (one batch), start it, wait until every one is acked."""
    cfg = write_config(tmp_path / "c.toml", broker.port)
    env = {"TENANT_TYPED": "1"}
    d = host.start("bnp", cfg, db, env=env)
    d.wait_connected()
    assert d.stop() == 0
    pub = Publisher(broker.port)
    for topic, payload in items:
        pub.send(topic, payload)
    pub.wait_acked(len(items))
    pub.close()
    d = host.start("bnp", cfg, db, env=env)
    st = d.wait_for(lambda s: s["acked"] >= len(items), what="all acked", timeout=40)
    return d, st


def test_typed_handlers_get_validated_values_and_a_bad_payload_is_a_dead_letter_naming_the_field(
        host, broker, tenant_db, tmp_path):
    # Given a dataclass, a msgspec.Struct and a pydantic handler, and for each one bad payload
    items = []
    for kind in ("dc", "struct", "pydantic"):
        items += [(f"typed/{kind}/d1", telemetry(i)) for i in range(10)]
        items.append((f"typed/{kind}/d1", {"seq": 99, "rssi": "strong", "temp": 1}))
    d, st = _run_typed(host, broker, tenant_db, tmp_path, items)
    # Then the good ones are stored by each handler, and each bad one is a dead letter
    for source in ("dc", "struct", "pydantic"):
        assert tenant_db.scalar(f"select count(*) from sensors_reading where source = '{source}'") == 10
    errors = sorted(e for (e,) in tenant_db.query("select error from mqttd_deadletter"))
    assert st["dead_letters"] == 3, errors
    assert errors[0] == "PayloadError: payload on typed/dc/d1: $.rssi: expected int, got str"
    assert errors[2] == "PayloadError: payload on typed/struct/d1: $.rssi: expected int, got str"
    assert errors[1].startswith("PayloadError: payload on typed/pydantic/d1: $.rssi: input should be a valid integer")
    assert d.stop() == 0


def test_a_typed_batch_route_gets_its_valid_messages_and_the_invalid_one_is_a_dead_letter(
        host, broker, tenant_db, tmp_path):
    items = [("typed/batch/d2", telemetry(i)) for i in range(30)]
    items[17] = ("typed/batch/d2", json.dumps({"seq": 17, "rssi": -1}))
    d, st = _run_typed(host, broker, tenant_db, tmp_path, items)
    assert tenant_db.scalar("select count(*) from sensors_reading where source = 'typedbatch'") == 29
    assert tenant_db.scalar("select count(*) from sensors_reading where seq = 17") == 0
    assert [e for (e,) in tenant_db.query("select error from mqttd_deadletter")] == [
        "PayloadError: payload on typed/batch/d2: $.temp: required field missing"]
    assert st["dead_letters"] == 1
    assert d.stop() == 0
