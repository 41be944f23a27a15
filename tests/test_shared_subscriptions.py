"""Shared subscriptions that cannot silently eat messages.

With `shared_group` (or several instances) mqttd subscribes through `$share/GROUP/...`. Brokers
without shared subscriptions (NATS, RabbitMQ before 3.13, aedes, amqtt) accept such a filter and
deliver nothing through it: 0 of 2,000 messages stored while `health` said ok. Now the daemon
proves on its first connection that the broker delivers through a shared filter, and exits 78
with the reason when it does not; `check` refuses the same; the canary goes through a shared
filter, so `health` sees what the routes see.
"""
import shutil

import pytest
from lab.daemon import write_config
from support.fakebroker import FakeBroker, connack_v5
from support.nats import NatsBroker
from lab.publish import publish_telemetry
from lab.waits import wait_rows


def test_a_shared_group_on_a_broker_without_shared_subscriptions_exits_78_not_silently_empty(host, sqlite_db, tmp_path):
    if not shutil.which("nats-server"):
        import os

        if os.environ.get("CI"):
            pytest.fail("nats-server is required in CI (scripts/setup installs it)")
        pytest.skip("nats-server not installed")
    # Given a NATS broker (MQTT 3.1.1; `$share/...` is taken as a filter nothing matches) and a
    # project configured to share its load
    nats = NatsBroker(tmp_path / "nats").start()
    try:
        cfg = write_config(tmp_path / "c.toml", nats.port, protocol="3.1.1",
                           broker_extra='shared_group = "bnp"')
        # when it starts
        d = host.start("bnp", cfg, sqlite_db)
        # then it exits 78 within the probe's time, naming the key and the reason
        assert d.wait_exit(40) == 78
        err = d.proc.stderr.read()
        assert "broker.shared_group" in err and "does not deliver shared subscriptions" in err, err
        assert "Traceback" not in err
        # and `mqttd check` refuses it in the same words
        r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
        assert r.returncode == 78, r.stdout + r.stderr
        assert "does not deliver shared subscriptions" in r.stderr and "NOT delivered" in r.stdout
        # while without shared_group the same broker serves the project
        plain = write_config(tmp_path / "plain.toml", nats.port, protocol="3.1.1")
        d = host.start("bnp", plain, sqlite_db)
        d.wait_connected(timeout=30)
        publish_telemetry(nats.port, 20, devices=2)
        wait_rows(sqlite_db, 20)
        assert d.stop() == 0
    finally:
        nats.stop()


def test_an_mqtt5_broker_that_says_it_has_no_shared_subscriptions_is_refused_at_once(host, sqlite_db, tmp_path):
    # Given an MQTT 5 broker whose CONNACK says SharedSubscriptionAvailable: 0 (as ejabberd's does)
    fake = FakeBroker(connack_v5(props=bytes([0x2A, 0x00]))).start()
    try:
        cfg = write_config(tmp_path / "c.toml", fake.port, protocol="5", broker_extra='shared_group = "bnp"')
        # when a project that shares starts, it exits 78 at the CONNACK, before subscribing
        d = host.start("bnp", cfg, sqlite_db)
        assert d.wait_exit(20) == 78
        err = d.proc.stderr.read()
        assert "SharedSubscriptionAvailable: 0" in err and "broker.shared_group" in err, err
    finally:
        fake.stop()


def test_on_mosquitto_a_shared_project_runs_and_its_canary_goes_through_a_shared_filter(host, broker, sqlite_db, tmp_path):
    # Given Mosquitto (shared subscriptions work) and a project with shared_group
    cfg = write_config(tmp_path / "c.toml", broker.port, broker_extra='shared_group = "bnp"')
    d = host.start("bnp", cfg, sqlite_db)
    st = d.wait_connected()
    # then its routes and its canary are subscribed through $share/ filters
    assert all(s.startswith("$share/") for s in st["subscriptions"]), st["subscriptions"]
    assert any(s.startswith("$share/bnp-canary-") and s.endswith("/mqttd/bnp/canary") for s in st["subscriptions"])
    publish_telemetry(broker.port, 50, devices=5)
    wait_rows(sqlite_db, 50)
    # and the canary makes its round trip (health sees what the routes see)
    d.wait_for(lambda s: s.get("canary_at"), timeout=20, what="a canary round trip")
    r = host.mqttd("health", "--project", "bnp")
    assert r.returncode == 0, r.stdout
    assert d.proc.poll() is None and d.stop() == 0
