"""Bad input: each gets a clear outcome (dead letter, one-line error and exit code, or a warning),
never a crash loop and never silent loss."""
import time

from lab.daemon import write_config
from lab.publish import Publisher, telemetry
from lab.waits import wait_rows, wait_until

HANG = "[dispatch]\nhandler_timeout = 1.5\nbatch_linger_ms = 300\n"


def _send(port, items):
    pub = Publisher(port)
    for topic, payload in items:
        pub.send(topic, payload)
    pub.wait_acked(len(items))
    pub.close()


def test_a_hanging_handler_is_cut_off_and_its_message_becomes_a_dead_letter(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port, extra=HANG)
    env = {"TENANT_HANG": "1"}
    d = host.start("bnp", cfg, sqlite_db, env=env)
    d.wait_connected()
    _send(broker.port, [("hang/a", telemetry(1)), ("hang/b", telemetry(2, hang=True)),
                        ("hang/c", telemetry(3))])
    assert d.wait_exit(30) == 70                        # the watchdog cut the hung handler off
    assert "hung on hang/b" in d.log()
    d = host.start("bnp", cfg, sqlite_db, env=env)      # what Supervisor does next
    wait_rows(sqlite_db, 2, where="source = 'hang'")
    wait_rows(sqlite_db, 1, table="mqttd_deadletter")
    topic, error = sqlite_db.query("select topic, error from mqttd_deadletter")[0]
    assert topic == "hang/b" and "HandlerTimeout" in error and "handler_timeout (1.5s)" in error
    assert sorted(r[0] for r in sqlite_db.query("select seq from sensors_reading")) == [1, 3]
    assert d.stop() == 0


def test_a_hang_inside_a_batch_handler_finds_the_culprit_and_keeps_its_neighbours(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port, extra=HANG)
    env = {"TENANT_HANG": "1"}
    d = host.start("bnp", cfg, sqlite_db, env=env)
    d.wait_connected()
    d.stop()
    _send(broker.port, [(f"hanglot/d{i}", telemetry(i, hang=(i == 3))) for i in range(6)])
    exits = 0
    for _ in range(3):                                  # Supervisor restarts it; at most twice
        d = host.start("bnp", cfg, sqlite_db, env=env)
        try:
            wait_until(lambda: sqlite_db.scalar("select count(*) from mqttd_deadletter") == 1
                       and sqlite_db.scalar("select count(*) from sensors_reading") == 5, 15, "settled")
            break
        except AssertionError:
            assert d.wait_exit(15) == 70
            exits += 1
    assert 1 <= exits <= 2
    assert sorted(r[0] for r in sqlite_db.query("select seq from sensors_reading")) == [0, 1, 2, 4, 5]
    assert sqlite_db.query("select topic from mqttd_deadletter") == [("hanglot/d3",)]
    assert d.stop() == 0


def test_payloads_that_do_not_decode_become_dead_letters(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port, extra="[dispatch]\nmax_payload = 2048\n")
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    _send(broker.port, [
        ("ble/utf/telemetry", b"\xff\xfe{"),                      # invalid UTF-8
        ("ble/json/telemetry", b"{'single': quotes}"),            # invalid JSON
        ("ble/empty/telemetry", b""),                             # empty payload
        ("ble/big/telemetry", b"{" + b" " * 5000 + b"}"),         # over max_payload
        ("ble/ok/telemetry", telemetry(1)),
    ])
    wait_rows(sqlite_db, 4, table="mqttd_deadletter")
    wait_rows(sqlite_db, 1)
    errors = dict(sqlite_db.query("select topic, error from mqttd_deadletter"))
    assert "not valid JSON" in errors["ble/utf/telemetry"]
    assert "not valid JSON" in errors["ble/json/telemetry"]
    assert "not valid JSON" in errors["ble/empty/telemetry"]
    assert "exceeds dispatch.max_payload (2048)" in errors["ble/big/telemetry"]
    assert d.proc.poll() is None and d.stop() == 0


def test_unusual_but_legal_topics_are_routed(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db)
    d.wait_connected()
    odd = ["ble/dév-ü €/telemetry", "ble/with space/telemetry", "ble/a$b%c/telemetry", "ble//telemetry"]
    _send(broker.port, [(t, telemetry(i)) for i, t in enumerate(odd)])
    wait_rows(sqlite_db, len(odd))
    assert {r[0] for r in sqlite_db.query("select device from sensors_reading")} == {"dév-ü €", "with space", "a$b%c", ""}
    assert d.stop() == 0


def test_a_missing_handler_module_is_a_config_error(host, broker, sqlite_db, tmp_path):
    extra = '[[subscribe]]\ntopic = "x/#"\nhandler = "nosuch.module.handler"\n'
    cfg = write_config(tmp_path / "c.toml", broker.port, extra=extra)
    r = host.mqttd("run", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
    assert r.returncode == 78 and "subscribe[0].handler" in r.stderr and "nosuch.module" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_database_that_does_not_exist_holds_messages_and_says_why(host, broker, tmp_path):
    from lab.db import TenantDB

    missing = TenantDB("postgres", "mqttd_test_no_such_database")
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), missing)
    d.wait_connected()
    _send(broker.port, [("ble/d/telemetry", telemetry(1))])
    st = d.wait_for(lambda s: s["db_ok"] is False, what="db error in status")
    assert "does not exist" in st["db_error"] and st["acked"] == 0
    r = host.mqttd("health", "--project", "bnp")
    assert r.returncode == 1 and "database unavailable" in r.stdout
    assert d.proc.poll() is None and d.stop() == 0


def test_an_unreachable_broker_is_retried_for_ever_and_health_says_why(host, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", 1, broker_extra="")
    cfg.write_text(cfg.read_text().replace('host = "127.0.0.1"', 'host = "no-such-host.invalid"'))
    d = host.start("bnp", cfg, sqlite_db)
    st = d.wait_for(lambda s: s.get("last_error") and "no-such-host.invalid" in s["last_error"], what="error")
    time.sleep(2)
    assert d.proc.poll() is None                         # still retrying, never exits
    st = d.status()
    assert st["connected"] is False
    r = host.mqttd("health", "--project", "bnp")
    assert r.returncode == 1 and "broker disconnected" in r.stdout and "no-such-host.invalid" in r.stdout
    assert d.stop() == 0


def test_a_project_name_built_to_escape_the_run_dir_is_refused(host, tmp_path):
    for name in ("../../etc/cron.d/x", "..", "a/../../b", "bnp\n"):
        r = host.mqttd("run", "--project", name)
        assert r.returncode == 2 and "must match" in r.stderr
    assert not any(host.root.parent.glob("etc*"))
