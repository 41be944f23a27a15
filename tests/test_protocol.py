"""Protocol negotiation and the broker's word (issue 15, item 2; docs/brokers.md).

- ``protocol = "auto"``: MQTT 5, and 3.1.1 where the broker refuses 5 (NATS answers "Unsupported
  protocol version"; RabbitMQ 3.10 closes the connection before any CONNACK), said once.
- An explicit ``"5"`` that the broker refuses: exit 78 with the reason, in `run` and `check`.
- The reconnect backoff is reset only by a connection that stayed up; an attempt closed before
  (or right after) CONNACK backs off, is logged once per reason and is in the status.
- The CONNACK's grants are honoured, logged where they differ from what was asked, and shown in
  the status (``granted``): a lowered session expiry, a ServerKeepAlive.
"""
import json
import os
import shutil
import threading
import time

import pytest
from lab.daemon import write_config
from support.fakebroker import FakeBroker, connack_v5, prop_u16, prop_u32
from support.nats import NatsBroker
from lab.publish import publish_telemetry, telemetry
from lab.waits import wait_rows


def _need(binary: str) -> None:
    if not shutil.which(binary):
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is required in CI (scripts/setup installs it)")
        pytest.skip(f"{binary} not installed")


@pytest.fixture
def nats(tmp_path):
    _need("nats-server")
    n = NatsBroker(tmp_path / "nats").start()
    yield n
    n.stop()


def test_auto_falls_back_to_311_on_nats_says_so_once_and_stores_everything(host, nats, sqlite_db, tmp_path):
    # Given NATS (MQTT 3.1.1 only: a v5 CONNECT gets "Unsupported protocol version") and protocol "auto"
    cfg = write_config(tmp_path / "c.toml", nats.port, protocol="auto")
    d = host.start("bnp", cfg, sqlite_db)
    # then the daemon connects speaking 3.1.1 and the status says so
    st = d.wait_connected(timeout=30)
    assert st["protocol"] == "3.1.1", st
    assert st["granted"]["protocol"] == "3.1.1" and st["granted"]["session_expiry"] is None
    publish_telemetry(nats.port, 20, devices=2)
    wait_rows(sqlite_db, 20)
    # and the log says once why 5 was given up
    log = d.log()
    assert log.count("speaking MQTT 3.1.1 for the life of this process") == 1, log
    assert "Unsupported protocol version" in log
    assert d.stop() == 0


def test_an_explicit_5_refused_by_nats_exits_78_with_the_reason_in_run_and_check(host, nats, sqlite_db, tmp_path):
    # Given NATS and protocol = "5" (before: retried for ever, ~80 attempts a minute)
    cfg = write_config(tmp_path / "c.toml", nats.port, protocol="5")
    t0 = time.monotonic()
    d = host.start("bnp", cfg, sqlite_db)
    # then `run` exits 78 at the first CONNACK, naming the key and the way out
    assert d.wait_exit(30) == 78
    assert time.monotonic() - t0 < 25
    err = d.proc.stderr.read()
    assert "broker.protocol" in err and "refuses MQTT 5" in err and '"auto"' in err, err
    assert "Traceback" not in err
    # and `check` refuses it in the same words
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
    assert r.returncode == 78, r.stdout + r.stderr
    assert "refuses MQTT 5" in r.stderr and "broker.protocol" in r.stderr


def test_check_reports_the_broker_as_it_is_on_nats(host, nats, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", nats.port, protocol="auto")
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "speaks MQTT 3.1.1: the broker refused MQTT 5 (CONNACK: Unsupported protocol version)" in out, out
    assert "in-flight window:" in out
    assert "persistent session across a reconnect: kept" in out, out


def test_check_reports_the_broker_as_it_is_on_mosquitto(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port, protocol="auto")
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "broker (mosquitto version" in out and "speaks MQTT 5" in out, out
    assert "maximum QoS 2, retained messages and wills available" in out and "receive maximum 20" in out, out
    assert "in-flight window: " in out and "persistent session across a reconnect: kept" in out, out
    assert "caveat: Mosquitto: max_queued_messages" in out and "max_inflight_messages" in out, out
    # the check's persistent session was ended afterwards: a clean reconnect finds none
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bnp-" + os.uname().nodename.split(".")[0] + "-check",
                    protocol=paho.MQTTv311, clean_session=False)
    seen = []
    c.on_connect = lambda cl, u, f, rc, p: seen.append(f.session_present)
    c.connect("127.0.0.1", broker.port)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        c.loop(0.1)
    c.disconnect()
    assert seen == [False]


@pytest.mark.parametrize("after_connack", [False, True], ids=["closed-before-connack", "closed-at-connack"])
def test_a_broker_that_closes_early_gets_backoff_not_a_storm_and_shows_in_the_status(host, sqlite_db, tmp_path,
                                                                                     after_connack):
    # Given a broker that closes every connection before (or right after) its CONNACK
    fb = FakeBroker(connack_v5() if after_connack else None, close_after_connack=after_connack).start()
    try:
        cfg = write_config(tmp_path / "c.toml", fb.port, protocol="3.1.1" if not after_connack else "5")
        d = host.start("bnp", cfg, sqlite_db)
        # then over 12 s the attempts back off (reconnect_min 0.2, max 2: about 10, not 60+)
        time.sleep(12)
        n = len(fb.connects)
        assert 3 <= n <= 16, n
        st = d.status()
        if not after_connack:
            assert "closed the connection before any CONNACK" in (st.get("last_error") or ""), st
            assert st["connect_failures"] >= 3 and "(attempt " in st["last_error"]
            # logged once, not once per attempt
            assert d.log().count("closed the connection before any CONNACK") == 1, d.log()
        else:
            assert st["connect_failures"] >= 3, st
        assert d.stop() == 0
    finally:
        fb.stop()


def test_granted_session_expiry_and_server_keepalive_are_honoured_logged_and_in_the_status(host, sqlite_db, tmp_path):
    # Given an MQTT 5 broker that grants 300 s of session expiry (86,400 asked) and a keepalive of
    # 3 s (10 asked), as ejabberd does with its own values
    props = prop_u32(0x11, 300) + prop_u16(0x13, 3) + prop_u16(0x21, 5)
    fb = FakeBroker(connack_v5(props=props)).start()
    try:
        cfg = write_config(tmp_path / "c.toml", fb.port, protocol="5", canary_interval=3600)
        d = host.start("bnp", cfg, sqlite_db)
        st = d.wait_connected()
        # then the status shows what was granted
        d.wait_for(lambda s: s.get("granted"), what="grants")
        g = d.status()["granted"]
        assert g["session_expiry"] == 300 and g["server_keepalive"] == 3 and g["keepalive"] == 3, g
        assert g["receive_maximum"] == 5 and d.status()["protocol"] == "5"
        # and the log says what the lowered session expiry costs
        log = d.log()
        assert "session expiry of 300 s (86400 s asked)" in log and "more than 5 min loses its session" in log, log
        assert "keepalive to 3 s (10 s asked)" in log
        # and the 3 s keepalive is kept: pings every ~3 s, not every 10 s
        time.sleep(8)
        pings = list(fb.pings)
        assert len(pings) >= 2, pings
        assert min(b - a for a, b in zip(pings, pings[1:])) < 5, pings
        assert st["connected"] and d.stop() == 0
    finally:
        fb.stop()


def test_a_server_keepalive_above_ours_never_makes_us_ping_less_often(host, sqlite_db, tmp_path):
    # ServerKeepAlive 600 (10 asked): paho would ping every 600 s and the daemon's watchdog
    # (2 * broker.keepalive + 10 = 30 s without a byte) would call a quiet connection dead.
    fb = FakeBroker(connack_v5(props=prop_u16(0x13, 600))).start()
    try:
        cfg = write_config(tmp_path / "c.toml", fb.port, protocol="5", keepalive=5,
                           canary_interval=3600)
        d = host.start("bnp", cfg, sqlite_db)
        d.wait_connected()
        time.sleep(12)
        assert len(fb.pings) >= 1, fb.pings
        g = d.status()["granted"]
        assert g["server_keepalive"] == 600 and g["keepalive"] == 5, g
        assert d.proc.poll() is None and d.stop() == 0
    finally:
        fb.stop()


def test_rabbitmq_310_auto_speaks_311_an_explicit_5_exits_78_and_check_names_the_prefetch(host, sqlite_db, tmp_path):
    # RabbitMQ 3.10 closes an MQTT 5 connection before any CONNACK (and logs ~100 lines per
    # attempt): before, mqttd retried for ever with nothing in its log or status.
    from support.rabbitmq import RabbitBroker

    try:
        rmq = RabbitBroker(tmp_path / "rabbit").start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"a private RabbitMQ node is required in CI: {exc}")
        pytest.skip(f"a private RabbitMQ node cannot start here: {exc}")
    try:
        # an explicit "5": exit 78 with the reason, once 3.1.1 is seen accepted where 5 was not
        cfg5 = write_config(tmp_path / "five.toml", rmq.port, protocol="5")
        d = host.start("bnp", cfg5, sqlite_db)
        assert d.wait_exit(40) == 78
        err = d.proc.stderr.read()
        assert "refuses MQTT 5" in err and "closed the connection before any CONNACK" in err, err
        # "auto": 3.1.1, said once, and every message stored
        cfg = write_config(tmp_path / "auto.toml", rmq.port, protocol="auto")
        d = host.start("bnp", cfg, sqlite_db)
        st = d.wait_connected(timeout=40)
        assert st["protocol"] == "3.1.1", st
        publish_telemetry(rmq.port, 30, devices=3)
        wait_rows(sqlite_db, 30)
        assert d.log().count("speaking MQTT 3.1.1 for the life of this process") == 1
        # the tenant's publisher under "auto" finds the same on its own connection (no probe)
        from mqttd.config import BrokerConfig
        from mqttd.mqtt import negotiate
        from mqttd.publisher import Publisher

        negotiate._PUBLISHER_PROTOCOL.clear()
        pub = Publisher(BrokerConfig(host="127.0.0.1", port=rmq.port, reconnect_min=0.1, reconnect_max=1.0),
                        project="bnp", timeout=30)
        pub.publish_many((f"ble/dev-{i % 3}/telemetry", json.dumps(telemetry(100 + i))) for i in range(20))
        conn = pub._connection()
        assert not conn.v5 and pub.connects == 1 and conn.client_id == pub.client_id
        assert "closed the connection before any CONNACK" in (conn.negotiation.reason or "")
        # ... and the MQTT 5 client it gave up is gone, not reconnecting under the same id (it was)
        def threads() -> list[str]:
            return [t.name for t in threading.enumerate() if t.name == f"paho-mqtt-client-{pub.client_id}"]

        time.sleep(2.5)
        assert len(threads()) == 1 and pub.connects == 1, threads()
        pub.close()
        assert threads() == []
        wait_rows(sqlite_db, 50)
        assert d.stop() == 0
        # and check reports the broker as it is: 3.1.1, the window of mqtt.prefetch, the caveat
        r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "broker (rabbitmq) speaks MQTT 3.1.1" in r.stdout, r.stdout
        assert "in-flight window: 10 QoS 1 messages" in r.stdout and "mqtt.prefetch" in r.stdout, r.stdout
        assert "persistent session across a reconnect: kept" in r.stdout, r.stdout
    finally:
        rmq.stop()


def test_auto_is_the_default_and_a_dedupe_property_needs_5(tmp_path):
    from mqttd.config import load
    from mqttd.errors import ConfigError

    def cfg(text):
        p = tmp_path / "c.toml"
        p.write_text('[django]\nsettings = "x.settings"\n' + text)
        return load(p, {})

    assert cfg("").broker.protocol == "auto"
    # a dedupe key in an MQTT 5 user property: "5" by default, and nothing else is accepted
    assert cfg('[dispatch]\ndedupe_property = "id"\n').broker.protocol == "5"
    for proto in ("auto", "3.1.1"):
        with pytest.raises(ConfigError) as e:
            cfg(f'[broker]\nprotocol = "{proto}"\n[dispatch]\ndedupe_property = "id"\n')
        assert "broker.protocol" in str(e.value) and "dedupe_property" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg('[broker]\nprotocol = "4"\n')
    assert '"auto", "5" or "3.1.1"' in str(e.value)
