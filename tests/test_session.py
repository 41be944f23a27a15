"""The MQTT session: 3.1.1 persistence, MQTT 5 dedupe property, credentials, removed filters, takeover."""
import subprocess
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from lab.broker import Broker
from lab.daemon import write_config
from lab.publish import Publisher, publish_telemetry, telemetry
from lab.waits import wait_rows, wait_until


def test_mqtt_311_persistent_session_keeps_messages_while_the_daemon_is_down(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port, protocol="3.1.1")
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    assert d.stop() == 0
    publish_telemetry(broker.port, 100, devices=3)
    d = host.start("bnp", cfg, sqlite_db)
    wait_rows(sqlite_db, 100)
    assert d.wait_connected()["session_gaps"] == 0
    assert d.stop() == 0


def test_mqtt5_dedupe_property_gives_one_row_per_message_id(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port, extra='[dispatch]\ndedupe_property = "msg-id"\n')
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    for i in range(10):
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("msg-id", f"m-{i}")
        for _ in range(3):                                # every message sent three times
            c.publish(f"ble/dev-{i}/telemetry", '{"seq": %d}' % i, qos=1, properties=props).wait_for_publish(5)
    c.publish("ble/dev-x/telemetry", '{"seq": 99}', qos=1).wait_for_publish(5)     # no key: no dedupe
    c.disconnect()
    c.loop_stop()
    st = d.wait_for(lambda s: s["handled"] + s["duplicates_skipped"] >= 31, what="all settled")
    assert sqlite_db.query("select count(*), count(distinct seq) from sensors_reading")[0] == (11, 11)
    assert st["duplicates_skipped"] == 20 and st["handled"] == 11
    assert d.stop() == 0


def _auth_broker(tmp_path, password: str) -> Broker:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "tenant", password], check=True, capture_output=True)
    pw.chmod(0o644)
    b = Broker(tmp_path / "authbroker", extra=f"password_file {pw}")
    b.write_conf()
    b.conf_path.write_text(b.conf_path.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    return b


def _start_raw(b: Broker) -> None:
    from lab.broker import wait_port

    b.proc = subprocess.Popen(["mosquitto", "-c", str(b.conf_path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    wait_port(b.port)


def test_wrong_credentials_on_the_first_connect_exit_78_and_the_password_never_leaks(host, sqlite_db, tmp_path):
    b = _auth_broker(tmp_path, "right-secret")
    _start_raw(b)
    try:
        secret = tmp_path / "secret"
        secret.write_text("wrong-secret-value\n")
        cfg = write_config(tmp_path / "c.toml", b.port, broker_extra=f'username = "tenant"\npassword_file = "{secret}"')
        d = host.start("bnp", cfg, sqlite_db)
        assert d.wait_exit(20) == 78
        err = d.proc.stderr.read()
        assert "refused" in err and "password" in err and len(err.strip().splitlines()) == 1
        assert "wrong-secret-value" not in err + d.log() + (host.run_dir / "bnp.status.json").read_text()
        secret.write_text("right-secret\n")
        d = host.start("bnp", cfg, sqlite_db)
        d.wait_connected()
        assert d.stop() == 0
        assert "right-secret" not in d.log()
    finally:
        b.stop()


def test_a_filter_removed_from_the_routes_is_unsubscribed_from_the_resumed_session(host, broker, sqlite_db, tmp_path):
    extra = '[[subscribe]]\ntopic = "legacy/#"\nhandler = "mqttd.inbox"\n'
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port, extra=extra), sqlite_db)
    assert "legacy/#" in d.wait_connected()["subscriptions"]
    assert d.stop() == 0
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db)
    d.wait_connected()
    assert "unsubscribing filters no longer routed: legacy/#" in d.log()
    pub = Publisher(broker.port)
    pub.send("legacy/x", b"old")
    pub.send("ble/dev-1/telemetry", telemetry(1))
    pub.wait_acked(2)
    pub.close()
    wait_rows(sqlite_db, 1)
    time.sleep(0.5)
    st = d.status()
    assert st["unrouted"] == 0          # the broker no longer delivers legacy/# to this session
    assert sqlite_db.scalar("select count(*) from mqttd_inboxmessage") == 0
    assert d.stop() == 0


def test_two_hosts_fighting_over_one_client_id_end_with_the_newcomer_exiting_73(host, broker, sqlite_db, tmp_path):
    from lab.daemon import Host

    other = Host(tmp_path / "other-host")       # a second host: its own run dir, so no shared lock
    cfg = write_config(tmp_path / "c.toml", broker.port, broker_extra='client_id = "shared-id"')
    a = host.start("bnp", cfg, sqlite_db)
    a.wait_connected()
    b = other.start("bnp", cfg, sqlite_db)
    try:
        assert wait_until(lambda: b.proc.poll(), 60, "the newcomer gives up") == 73
        assert "another client is using the same client id" in b.log()
        assert "shared-id" in b.log()
        assert a.proc.poll() is None                    # the copy that was there first goes on
        a.wait_for(lambda s: s["connected"], 20, "the first copy connected again")
    finally:
        other.reap()


def test_a_daemon_restarted_after_kill_9_is_no_twin_of_its_dead_predecessor(host, broker, sqlite_db, tmp_path):
    # The broker keeps the killed daemon's retained owner record. A flapping broker then gives the
    # new daemon short-lived connections: that must not look like a takeover fight (exit 73).
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    d.kill()
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    for round_ in range(1, 5):
        broker.restart()
        d.wait_for(lambda s, n=round_: s["connected"] and s["reconnects"] >= n, 30, f"reconnect {round_}")
    assert d.proc.poll() is None
    assert "another client is using the same client id" not in d.log()
    assert d.stop() == 0


def test_a_frozen_broker_is_detected_by_keepalive_and_nothing_is_lost(host, broker, sqlite_db, tmp_path):
    import os
    import signal

    cfg = write_config(tmp_path / "c.toml", broker.port, keepalive=5)
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    pub = Publisher(broker.port)
    for i in range(50):
        pub.send(f"ble/dev-{i % 5}/telemetry", telemetry(i))
    pub.wait_acked(50)
    os.kill(broker.proc.pid, signal.SIGSTOP)        # TCP stays open, nothing answers, not even PINGRESP
    try:
        d.wait_for(lambda s: not s["connected"], timeout=30, what="keepalive noticed the frozen broker")
        assert d.proc.poll() is None
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    for i in range(50, 100):
        pub.send(f"ble/dev-{i % 5}/telemetry", telemetry(i))
    pub.wait_acked(100)
    pub.close()
    wait_rows(sqlite_db, 100, what="count(distinct seq)", timeout=60)
    assert d.wait_connected()["reconnects"] >= 1
    assert d.stop() == 0


def _daemon_with_a_hung_handler(host, broker, sqlite_db, tmp_path):
    """A daemon whose batch in hand is a handler call that hangs (well short of its time limit)."""
    cfg = write_config(tmp_path / "c.toml", broker.port, extra="[dispatch]\nhandler_timeout = 600\n")
    d = host.start("bnp", cfg, sqlite_db, env={"TENANT_HANG": "1"})
    d.wait_connected()
    pub = Publisher(broker.port)
    pub.send("hang/x", telemetry(1, hang=True))
    pub.wait_acked(1)
    pub.close()
    d.wait_for(lambda s: s["backlog"] >= 1, what="the hung batch in hand")
    return cfg, d


def test_sigterm_with_a_hung_handler_exits_0_in_time_and_leaves_the_message_for_the_next_run(
        host, broker, sqlite_db, tmp_path):
    import signal

    cfg, d = _daemon_with_a_hung_handler(host, broker, sqlite_db, tmp_path)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(15) == 0 and time.monotonic() - t0 < 10   # inside Supervisor's stopwaitsecs
    log = d.log()
    assert "handler sensors.mqtt_handlers.hang_one running for" in log and "leaving it un-acked" in log
    assert "without finishing the batch in hand" in log and "stopped cleanly" not in log
    d = host.start("bnp", cfg, sqlite_db, env={"TENANT_HANG": "1"})
    d.wait_for(lambda s: s["backlog"] >= 1, what="the message delivered again")
    d.kill()


def test_a_second_sigterm_exits_at_once_even_with_a_hung_handler(host, broker, sqlite_db, tmp_path):
    import signal

    cfg, d = _daemon_with_a_hung_handler(host, broker, sqlite_db, tmp_path)
    d.signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    code = d.wait_exit(5)
    assert code == 128 + signal.SIGTERM and time.monotonic() - t0 < 2


def test_a_batch_that_takes_longer_than_the_keepalive_does_not_cost_the_connection(host, broker, sqlite_db, tmp_path):
    # Given a handler that takes 40 ms a message, batches of 300 (12 s each without an ack, more
    # than twice the 5 s keepalive, no canary meanwhile) and a wide receive window, so that the
    # PINGRESP to paho's PINGREQ arrives behind hundreds of messages the intake has no room for
    cfg = write_config(tmp_path / "c.toml", broker.port, keepalive=5, broker_extra="receive_maximum = 1000",
                       extra="[dispatch]\nbatch_size = 300\nmax_backlog = 300\n", canary_interval=60)
    d = host.start("bnp", cfg, sqlite_db, env={"TENANT_SLOW_MS": "40"})
    d.wait_connected()
    # when 900 messages arrive at once
    pub = Publisher(broker.port)
    for seq in range(900):
        pub.send(f"slow/dev-{seq % 4}", telemetry(seq))
    pub.wait_acked(900)
    pub.close()
    # then the session survives (keepalive traffic is still read while the intake is full), and
    # nothing is delivered twice
    wait_rows(sqlite_db, 900, where="source = 'slow'", timeout=120)
    st = d.wait_for(lambda s: s["acked"] >= 900, what="all acked")
    assert st["reconnects"] == 0 and st["connected"], st
    assert "Keep alive timeout" not in d.log()
    assert sqlite_db.scalar("select count(*) from sensors_reading where source = 'slow'") == 900
    assert d.stop() == 0


def test_a_connect_stuck_in_a_slow_dns_lookup_is_waited_out_not_called_a_stall(host, broker, sqlite_db, tmp_path):
    # Given a resolver that takes 35 s to answer the daemon's first lookup (longer than the 30 s
    # after which a network loop that does not turn is called a hang)
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, sqlite_db, env={"TENANT_SLOW_DNS_S": "35"})
    # When the daemon waits on it
    time.sleep(33)
    # Then it is still up (no watchdog exit 70), and connects once the answer comes
    assert d.proc.poll() is None, d.stderr()
    assert not d.status().get("connected")
    d.wait_connected(30)
    publish_telemetry(broker.port, 10, devices=2)
    wait_rows(sqlite_db, 10)
    assert "connecting to 127.0.0.1" in d.log() and "took" in d.log()
    assert d.stop() == 0


def test_new_filters_are_subscribed_before_stale_ones_are_unsubscribed(host, sqlite_db, tmp_path):
    """A stale filter may overlap a new one (legacy ble/# -> ble/+/telemetry): unsubscribing it
    first leaves a moment in which the broker delivers matching messages to neither."""
    b = Broker(tmp_path / "logging-broker", extra="log_type all").start()
    try:
        extra = '[[subscribe]]\ntopic = "legacy/#"\nhandler = "mqttd.inbox"\n'
        d = host.start("bnp", write_config(tmp_path / "c.toml", b.port, extra=extra), sqlite_db)
        d.wait_connected()
        assert d.stop() == 0
        d = host.start("bnp", write_config(tmp_path / "c.toml", b.port), sqlite_db)
        d.wait_connected()
        wait_until(lambda: "Received UNSUBSCRIBE" in b.log(), 10, "the UNSUBSCRIBE")
        assert d.stop() == 0
        second_run = b.log().rsplit("New client connected", 1)[1]
        assert second_run.index("Received SUBSCRIBE") < second_run.index("Received UNSUBSCRIBE")
    finally:
        b.stop()


def test_garbage_on_the_owner_topic_never_stops_the_daemon(host, broker, sqlite_db, tmp_path):
    """Anyone can publish a retained record on mqttd/NAME/owner/CLIENTID, and the broker hands it
    back on every start: nothing in it may end the network thread (that would be a crash loop)."""
    import socket

    from mqttd.identity import short_hostname

    owner_topic = f"mqttd/bnp/owner/bnp-{short_hostname()}"
    me = socket.gethostname()
    garbage = [f"{me}:{'9' * 400}:1700000000.0".encode(),     # os.kill raises OverflowError
               f"{me}:0:1700000000.0".encode(),               # pid 0: our own process group, "alive"
               f"{me}:-1:1700000000.0".encode(),
               b"\xff\xfe\x00garbage:\x80:\x81",                 # not UTF-8
               f"{me}:1:inf".encode(), f"{me}:1:nan".encode(), b"::", b":",
               b"x" * 2_000_000]                                # huge
    cfg = write_config(tmp_path / "c.toml", broker.port)
    pub = Publisher(broker.port)
    for n, payload in enumerate(garbage):
        # Given garbage retained on the owner topic before the daemon starts
        pub.send(owner_topic, payload, retain=True)
        pub.wait_acked(2 * n + 1)
        d = host.start("bnp", cfg, sqlite_db)
        d.wait_connected()
        # When more arrives while it runs (an empty payload too)
        pub.send(owner_topic, b"" if n % 2 else payload[::-1], retain=False)
        # Then it stores messages, is nobody's twin, and stops cleanly
        pub.send("ble/dev-1/telemetry", telemetry(n))
        pub.wait_acked(2 * n + 2)
        wait_rows(sqlite_db, n + 1)
        assert d.proc.poll() is None and "network thread died" not in d.log()
        assert "another process uses this name" not in d.log()
        assert d.stop() == 0, d.stderr()
    pub.close()
