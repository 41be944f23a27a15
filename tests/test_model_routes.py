"""Model routes (docs/handlers.md "Model routes"): a [[subscribe]] table with `model` and
`fields` stores rows without handler code, on PostgreSQL (binary COPY) and SQLite, under the same
promise as any route; `mqttd check` refuses a mapping that does not fit the model (exit 78).

Real mosquitto, the real daemon as a subprocess, the sample tenant's `sensors.Sample` model.
"""
import datetime as dt
import json
import sqlite3

import pytest
from lab.daemon import write_config
from lab.publish import Publisher
from lab.waits import wait_rows


def model_route(extra: str = "") -> str:
    """The [[subscribe]] table (``extra``: more keys of it), its fields as a sub-table."""
    return f'''
[[subscribe]]
topic = "sample/{{device}}/telemetry"
model = "sensors.Sample"
{extra}
[subscribe.fields]
device = "{{device}}"
seq = "$.seq"
rssi = "$.m.rssi"
temp = "$.m.temp"
topic = "$topic"
extra = "$.extra"
code = "$.code?"
received_at = "$received_at"
'''


MODEL_ROUTE = model_route()


def _config(tmp_path, port, extra=MODEL_ROUTE):
    return write_config(tmp_path / "c.toml", port, extra=extra)


def _sample(seq, **extra):
    return {"seq": seq, "m": {"rssi": -40 - seq % 30, "temp": 20.5 + seq % 3}, "extra": {"fw": "1.2", "n": seq},
            **extra}


def _queue(port, items):
    """Publish (topic, payload) pairs and wait for the broker's PUBACKs."""
    pub = Publisher(port)
    for topic, payload in items:
        pub.send(topic, payload if isinstance(payload, bytes) else json.dumps(payload))
    pub.wait_acked(len(items))
    pub.close()


def _execute(db, sql):
    """One committed statement on the tenant database."""
    if db.engine == "sqlite":
        conn = sqlite3.connect(db.name, timeout=30)
        with conn:
            conn.execute(sql)
        conn.close()
        return
    import psycopg
    from lab.db import PG

    with psycopg.connect(dbname=db.name, autocommit=True, **PG) as conn:
        conn.execute(sql)


def _start_stopped(host, cfg, db):
    """Start once (the persistent session subscribes), stop: what is queued next arrives as one batch."""
    d = host.start("bnp", cfg, db)
    d.wait_connected()
    assert d.stop() == 0


def test_a_model_route_stores_every_message_as_a_row_without_handler_code(host, broker, tenant_db, tmp_path):
    # Given a model route mapping a topic parameter, JSON paths, $topic and $received_at
    cfg = _config(tmp_path, broker.port)
    d = host.start("bnp", cfg, tenant_db)
    d.wait_connected()
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    # When 1000 messages arrive over 4 devices
    _queue(broker.port, [(f"sample/d{i % 4}/telemetry", _sample(i)) for i in range(1000)])
    # Then there is one row per message, every value where the mapping says
    wait_rows(tenant_db, 1000, table="sensors_sample")
    st = d.wait_for(lambda s: s["acked"] >= 1000, what="acks")
    assert st["dead_letters"] == 0
    assert tenant_db.scalar("select count(distinct seq) from sensors_sample") == 1000
    assert tenant_db.scalar("select count(*) from sensors_sample where device = 'd3'") == 250
    row = tenant_db.query("select device, rssi, temp, topic, extra, code, received_at, stored_at "
                          "from sensors_sample where seq = 7")[0]
    device, rssi, temp, topic, extra, code, received_at, stored_at = row
    assert (device, rssi, temp, topic, code) == ("d3", -47, 21.5, "sample/d3/telemetry", None)
    assert (json.loads(extra) if isinstance(extra, str) else extra) == {"fw": "1.2", "n": 7}
    for stamp in (received_at, stored_at):          # $received_at and auto_now_add: the time of this run
        stamp = stamp if isinstance(stamp, dt.datetime) else dt.datetime.fromisoformat(stamp)
        assert stamp.replace(tzinfo=dt.UTC) >= before - dt.timedelta(seconds=2), stamp
    assert "bulk_create instead of COPY" not in d.log()
    assert d.stop() == 0


def test_a_value_that_does_not_fit_is_a_dead_letter_naming_the_field_and_its_neighbours_are_stored(
        host, broker, tenant_db, tmp_path):
    cfg = _config(tmp_path, broker.port)
    _start_stopped(host, cfg, tenant_db)
    # Given one batch of 40 messages with five bad ones among them: a wrong type, a missing value,
    # a value past max_length, a payload that is not JSON, and a code the database refuses (unique)
    items = [(f"sample/d{i % 2}/telemetry", _sample(i, code=f"c{i}")) for i in range(40)]
    items[3] = ("sample/d1/telemetry", _sample(3, m={"rssi": "strong", "temp": 1}))
    items[10] = ("sample/d0/telemetry", {"m": {"rssi": 1, "temp": 1}})
    items[20] = ("sample/toolongdevice-name/telemetry", _sample(20))
    items[25] = ("sample/d1/telemetry", b"{not json")
    items[33] = ("sample/d1/telemetry", _sample(33, code="c5"))          # c5 is stored by seq 5
    _queue(broker.port, items)
    # When the daemon handles them
    d = host.start("bnp", cfg, tenant_db)
    st = d.wait_for(lambda s: s["acked"] >= 40, what="all acked", timeout=40)
    # Then the 35 good ones are stored and each bad one is a dead letter that says why
    assert tenant_db.scalar("select count(*) from sensors_sample") == 35
    assert st["dead_letters"] == 5
    errors = [e for (e,) in tenant_db.query("select error from mqttd_deadletter order by id")]
    text = "\n".join(errors)
    assert "field rssi ($.m.rssi): expected int, got str" in text, text
    assert "field seq ($.seq): missing" in text, text
    assert "field device ({device}): 18 characters, longer than max_length 16" in text, text
    assert "not valid JSON" in text, text
    assert any(e.startswith("IntegrityError") for e in errors), text
    routes = {r for (r,) in tenant_db.query("select route from mqttd_deadletter")}
    assert routes == {"model:sensors.Sample:sample/{device}/telemetry"}
    assert d.stop() == 0


def test_dedupe_on_a_model_route_stores_a_redelivered_message_once(host, broker, tenant_db, tmp_path):
    cfg = _config(tmp_path, broker.port, model_route('dedupe = "$.id"'))
    d = host.start("bnp", cfg, tenant_db)
    d.wait_connected()
    # Given 30 messages with an id, and the first 10 of them published again (a publisher's retry)
    first = [("sample/d1/telemetry", _sample(i, id=f"m-{i}")) for i in range(30)]
    _queue(broker.port, first)
    wait_rows(tenant_db, 30, table="sensors_sample")
    _queue(broker.port, first[:10])
    # Then each id is stored once and the copies are counted as duplicates
    st = d.wait_for(lambda s: s["duplicates_skipped"] >= 10, what="10 duplicates")
    assert tenant_db.scalar("select count(*) from sensors_sample") == 30
    assert tenant_db.scalar("select count(*) from mqttd_processedkey") == 30
    assert st["dead_letters"] == 0
    assert d.stop() == 0


@pytest.mark.parametrize("fields, key, words", [
    ('{ device = "{device}", seq = "$.seq", colour = "$.c" }', "subscribe[0].fields.colour",
     ["sensors.Sample has no field 'colour'"]),
    ('{ device = "{device}", seq = "$received_at" }', "subscribe[0].fields.seq",
     ["wrong type: $received_at (received at) cannot fill sensors.Sample.seq (BigIntegerField)"]),
    ('{ device = "{device}", rssi = "$.rssi" }', "subscribe[0].fields",
     ["missing required field sensors.Sample.seq"]),
    ('{ device = "{site}", seq = "$.seq" }', "subscribe[0].fields.device",
     ["{site} is not a parameter of topic"]),
    ('{ device = "{device}", seq = "seq" }', "subscribe[0].fields.seq", ["'seq' is not a value"]),
])
def test_check_refuses_a_mapping_that_does_not_fit_the_model_as_run_does(host, broker, sqlite_db, tmp_path,
                                                                         fields, key, words):
    cfg = _config(tmp_path, broker.port, f'[[subscribe]]\ntopic = "sample/{{device}}/t"\nmodel = "sensors.Sample"\n'
                                         f"fields = {fields}\n")
    for cmd in ("check", "run"):
        r = host.mqttd(cmd, "--project", "bnp", "--config", str(cfg), db=sqlite_db, timeout=30)
        err = r.stderr.strip()
        assert r.returncode == 78, (cmd, r.returncode, err, r.stdout[-1000:])
        assert "Traceback" not in err and f"{cfg}: {key}: " in err, (cmd, err)
        for w in words:
            assert w in err, (cmd, w, err)


def test_check_lists_a_good_model_route_with_its_columns(host, broker, sqlite_db, tmp_path):
    cfg = _config(tmp_path, broker.port, model_route('dedupe = "$.id"'))
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("sample/{device}/telemetry -> model:sensors.Sample:sample/{device}/telemetry (batch) qos=1 payload: "
            "model sensors.Sample (device, seq, rssi, temp, topic, extra, code, received_at; COPY on PostgreSQL, "
            "bulk insert elsewhere) dedupe") in r.stdout, r.stdout


def test_replay_stores_a_model_routes_dead_letter_once_its_cause_is_gone(host, broker, tenant_db, tmp_path):
    # Given a row refused by the database (its code is taken) and one with a value that does not fit
    cfg = _config(tmp_path, broker.port)
    d = host.start("bnp", cfg, tenant_db)
    d.wait_connected()
    _queue(broker.port, [("sample/d1/telemetry", _sample(1, code="k"))])
    wait_rows(tenant_db, 1, table="sensors_sample")
    _queue(broker.port, [("sample/d1/telemetry", _sample(2, code="k")),
                         ("sample/d1/telemetry", _sample(3, m={"rssi": 1.5, "temp": 1}))])
    d.wait_for(lambda s: s["dead_letters"] >= 2, what="2 dead letters")
    assert d.stop() == 0
    # When the taken code is freed and the letters are replayed
    _execute(tenant_db, "update sensors_sample set code = null where seq = 1")
    r = host.mqttd("replay", "--project", "bnp", "--config", str(cfg), db=tenant_db)
    # Then the refused row is stored through the same route, and the bad value stays a dead letter
    assert tenant_db.scalar("select count(*) from sensors_sample where seq = 2 and code = 'k'") == 1, r.stdout + r.stderr
    left = tenant_db.query("select error, attempts from mqttd_deadletter")
    assert len(left) == 1 and "field rssi ($.m.rssi): expected int, got float" in left[0][0], left
    assert left[0][1] == 2


@pytest.mark.parametrize("table, key, words", [
    ({"topic": "a/b", "model": "sensors.Sample", "handler": "x.y", "fields": {"seq": "$.s"}}, "subscribe[0].model",
     "and handler exclude each other"),
    ({"topic": "a/b", "model": "sensors.Sample"}, "subscribe[0].fields", "is required with model"),
    ({"topic": "a/b", "handler": "x.y", "fields": {"seq": "$.s"}}, "subscribe[0].fields", "belongs to a model route"),
    ({"topic": "a/b", "model": "sensors.Sample", "fields": {"seq": 3}}, "subscribe[0].fields.seq", "must be str"),
    ({"topic": "a/b"}, "subscribe[0].handler", "is required"),
])
def test_the_subscribe_table_of_a_model_route_is_checked_at_load(table, key, words):
    from mqttd.config import parse
    from mqttd.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse({"subscribe": [table]}, "c.toml", {})
    assert err.value.key == key and words in err.value.reason, str(err.value)


def test_a_model_route_table_is_read_into_the_subscription():
    from mqttd.config import parse

    sub = parse({"subscribe": [{"topic": "s/{d}", "model": "sensors.Sample", "dedupe": "$.id",
                                "fields": {"device": "{d}", "seq": "$.seq"}}]}, "c.toml", {}).subscribe[0]
    assert (sub.handler, sub.model, sub.fields, sub.dedupe) == (None, "sensors.Sample",
                                                                 (("device", "{d}"), ("seq", "$.seq")), "$.id")
