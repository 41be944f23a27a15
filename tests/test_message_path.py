"""The delivery promise (docs/delivery.md) against a real mosquitto, real Django on SQLite and PostgreSQL."""
import subprocess
import time

import pytest
from lab.daemon import write_config
from lab.publish import Publisher, telemetry
from lab.waits import wait_rows, wait_until


def _publish(port, n, topic="ble/dev-{k}/telemetry", devices=5, start=0, **extra):
    pub = Publisher(port)
    for i in range(start, start + n):
        pub.send(topic.format(k=i % devices), telemetry(i, **extra))
    pub.wait_acked(n)
    pub.close()


def test_n_messages_become_n_rows_with_the_device_from_the_topic(host, broker, tenant_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), tenant_db)
    d.wait_connected()
    _publish(broker.port, 1000)
    wait_rows(tenant_db, 1000)
    assert tenant_db.scalar("select count(distinct seq) from sensors_reading") == 1000
    assert tenant_db.scalar("select count(*) from sensors_reading where device = 'dev-3'") == 200
    st = d.wait_for(lambda s: s["acked"] >= 1000, what="acks")
    assert st["dead_letters"] == 0 and st["backlog"] == 0
    assert d.stop() == 0


def test_batch_route_receives_lists_with_params(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db)
    d.wait_connected()
    _publish(broker.port, 500, topic="bulk/dev-{k}/telemetry")
    wait_rows(sqlite_db, 500, where="source = 'bulk'")
    assert sqlite_db.scalar("select count(distinct device) from sensors_reading") == 5
    assert d.stop() == 0


def test_bad_json_and_a_raising_handler_become_dead_letters_and_their_neighbours_are_stored(host, broker, tenant_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, tenant_db)
    d.wait_connected()
    d.stop()
    # Queue everything while the daemon is away so that it arrives as one batch.
    pub = Publisher(broker.port)
    for i in range(50):
        if i == 10:
            pub.send("ble/dev-1/telemetry", b"{not json")
        elif i == 20:
            pub.send("ble/dev-2/telemetry", telemetry(i, fail=True))
        elif i == 30:
            pub.send("bulk/dev-3/telemetry", telemetry(i, fail=True))
        elif i % 2:
            pub.send("bulk/dev-3/telemetry", telemetry(i))
        else:
            pub.send("ble/dev-1/telemetry", telemetry(i))
    pub.send("strict/dup", b"")
    pub.send("strict/dup", b"")      # constraint violation: unique code
    pub.wait_acked(52)
    pub.close()
    d = host.start("bnp", cfg, tenant_db)
    wait_rows(tenant_db, 2, table="mqttd_deadletter", timeout=30)
    st = d.wait_for(lambda s: s["acked"] >= 52, what="all acked")
    wait_rows(tenant_db, 47)
    letters = tenant_db.query("select topic, error, attempts from mqttd_deadletter order by id")
    errors = " | ".join(e for _, e, _ in letters)
    assert len(letters) == 4, letters
    assert "not valid JSON" in errors and "told to fail (seq 20)" in errors and "told to fail (seq 30)" in errors
    assert "IntegrityError" in errors
    assert tenant_db.scalar("select count(*) from sensors_strict") == 1
    assert tenant_db.scalar("select count(*) from sensors_reading") == 47
    assert st["dead_letters"] == 4
    assert d.stop() == 0


def test_failures_at_the_edges_and_side_by_side_in_one_batch_spare_every_neighbour(host, broker, tenant_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, tenant_db)
    d.wait_connected()
    d.stop()
    # Given a batch whose first two, middle and last two messages raise, with dedupe-keyed
    # messages among them (five of them sent twice), queued while the daemon is away
    failing = {0, 1, 150, 298, 299}
    pub = Publisher(broker.port)
    for i in range(300):
        pub.send(f"ble/dev-{i % 3}/telemetry", telemetry(i, fail=i in failing))
        if i % 15 == 0:
            pub.send("dedupe/dev-9/telemetry", telemetry(1000 + i))
        if i % 60 == 0:
            pub.send("dedupe/dev-9/telemetry", telemetry(1000 + i))      # a duplicate in the same batch
    pub.wait_acked(300 + 20 + 5)
    pub.close()
    # when it starts
    d = host.start("bnp", cfg, tenant_db)
    st = d.wait_for(lambda s: s["acked"] >= 325, what="all acked")
    # then exactly the five raising messages are dead letters and everything else is stored once
    wait_rows(tenant_db, 295, where="source = 'single'")
    wait_rows(tenant_db, 20, where="source = 'dedupe'")
    letters = tenant_db.query("select error from mqttd_deadletter")
    assert sorted(int(e.split("seq ")[1].rstrip(")")) for (e,) in letters) == sorted(failing)
    assert tenant_db.scalar("select count(distinct seq) from sensors_reading where source = 'single'") == 295
    assert tenant_db.scalar("select count(*) from sensors_reading where source = 'dedupe'") == 20
    assert st["dead_letters"] == 5 and st["duplicates_skipped"] == 5
    assert d.stop() == 0


def test_a_duplicate_for_one_route_runs_only_the_other_even_beside_a_failing_message(host, broker, sqlite_db, tmp_path):
    # Given a topic with two routes, one keyed (dedupe) and one not, and a message already stored
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, sqlite_db, env={"TENANT_OVERLAP": "1"})
    d.wait_connected()
    _publish(broker.port, 1, topic="dedupe/dev-1/telemetry")
    wait_rows(sqlite_db, 1, where="source = 'every'")
    d.stop()
    # when the same message comes again in one batch with a message whose handler raises
    pub = Publisher(broker.port)
    pub.send("dedupe/dev-1/telemetry", telemetry(0))
    pub.send("ble/dev-2/telemetry", telemetry(1, fail=True))
    pub.wait_acked(2)
    pub.close()
    d = host.start("bnp", cfg, sqlite_db, env={"TENANT_OVERLAP": "1"})
    d.wait_for(lambda s: s["acked"] >= 2 and s["dead_letters"] == 1, what="both acked")
    # then the keyed route ran once in all, the other once per copy
    wait_rows(sqlite_db, 2, where="source = 'every'")
    assert sqlite_db.scalar("select count(*) from sensors_reading where source = 'dedupe'") == 1
    assert d.stop() == 0


def test_kill_9_mid_stream_loses_nothing_and_a_dedupe_key_gives_exactly_one_row(host, broker, tenant_db, tmp_path):
    n = 3000
    cfg = write_config(tmp_path / "c.toml", broker.port, extra="[dispatch]\nbatch_size = 25\n")
    d = host.start("bnp", cfg, tenant_db)
    d.wait_connected()
    pub = Publisher(broker.port)
    for i in range(n):
        pub.send(f"ble/dev-{i % 5}/telemetry", telemetry(i))
        pub.send(f"dedupe/dev-{i % 5}/telemetry", telemetry(i))
    pub.wait_acked(2 * n)
    pub.close()
    wait_until(lambda: tenant_db.scalar("select count(*) from sensors_reading") > 200, 30, "some rows")
    d.kill()
    in_db = tenant_db.scalar("select count(*) from sensors_reading")
    assert in_db < 2 * n, "the kill came too late to be mid-stream"
    d2 = host.start("bnp", cfg, tenant_db)
    wait_rows(tenant_db, n, where="source = 'single'", timeout=90, what="count(distinct seq)")
    wait_rows(tenant_db, n, where="source = 'dedupe'", timeout=90)
    d2.wait_for(lambda s: s["backlog"] == 0 and time.time() - (s["last_message_at"] or 0) > 1, what="quiet")
    single = tenant_db.query("select count(*), count(distinct seq) from sensors_reading where source='single'")[0]
    dedupe = tenant_db.query("select count(*), count(distinct seq) from sensors_reading where source='dedupe'")[0]
    assert single[1] == n                       # nothing lost
    assert dedupe == (n, n)                     # exactly one row per message with a dedupe key
    print(f"duplicates without a dedupe key: {single[0] - n}; skipped by dedupe: {d2.status()['duplicates_skipped']}")
    assert d2.stop() == 0


def test_broker_killed_and_restarted_mid_stream_loses_nothing(host, broker, sqlite_db, tmp_path):
    n = 2000
    cfg = write_config(tmp_path / "c.toml", broker.port, extra="[dispatch]\nbatch_size = 20\n")
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    d.stop()
    _publish(broker.port, n)
    time.sleep(2.5)                       # past the broker's 1 s autosave: the queue is on disk
    d = host.start("bnp", cfg, sqlite_db)
    wait_until(lambda: sqlite_db.scalar("select count(*) from sensors_reading") > 100, 30, "consumption")
    broker.kill()                         # SIGKILL, mid-stream
    assert sqlite_db.scalar("select count(*) from sensors_reading") < n
    time.sleep(1)
    broker.start()
    wait_rows(sqlite_db, n, timeout=90, what="count(distinct seq)")
    d.wait_for(lambda s: s["connected"] and s["reconnects"] >= 1, what="reconnected")
    assert sqlite_db.scalar("select count(distinct seq) from sensors_reading") == n
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_broker_restart_without_a_session_is_counted_as_a_gap_and_resubscribed(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db)
    d.wait_connected()
    broker.stop()
    broker.wipe()
    broker.start()
    st = d.wait_for(lambda s: s["connected"] and s["session_gaps"] >= 1, what="session gap")
    assert st["reconnects"] >= 1
    _publish(broker.port, 10)             # subscriptions were renewed on the new session
    wait_rows(sqlite_db, 10)
    assert "possible" in d.log() or "may be lost" in d.log()
    assert d.stop() == 0


@pytest.mark.postgres
def test_postgres_connections_terminated_mid_stream_lose_nothing_and_the_process_stays_up(host, broker, pg_db, tmp_path):
    n = 3000
    cfg = write_config(tmp_path / "c.toml", broker.port, extra="[dispatch]\nbatch_size = 20\n")
    d = host.start("bnp", cfg, pg_db)
    d.wait_connected()
    pub = Publisher(broker.port)
    for i in range(n):
        pub.send(f"ble/dev-{i % 5}/telemetry", telemetry(i))
    wait_until(lambda: pg_db.scalar("select count(*) from sensors_reading") > 100, 30, "consumption")
    killed = 0
    for _ in range(3):
        killed += pg_db.terminate_backends()
        time.sleep(0.3)
    pub.wait_acked(n)
    pub.close()
    assert killed >= 1
    wait_rows(pg_db, n, timeout=90, what="count(distinct seq)")
    assert pg_db.scalar("select count(distinct seq) from sensors_reading") == n
    assert d.proc.poll() is None
    st = d.wait_for(lambda s: s["db_ok"] is True, what="database ok in the status")
    assert st["db_retries"] >= 1                 # the terminations were noticed and retried
    assert d.stop() == 0


def test_database_down_holds_messages_unacked_and_stays_up(host, broker, sqlite_db, tmp_path):
    """The tenant's database disappears (file made unreadable): nothing acked, no exit, then recovery."""
    import os

    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    db_path = sqlite_db.name
    moved = db_path + ".away"
    os.rename(db_path, moved)
    os.mkdir(db_path)                    # opening a directory as SQLite fails: "unable to open database"
    try:
        _publish(broker.port, 20)
        st = d.wait_for(lambda s: s["db_ok"] is False, what="db outage noticed")
        assert st["acked"] == 0 or st["acked"] < st["received"]
        time.sleep(1)
        assert d.proc.poll() is None
    finally:
        os.rmdir(db_path)
        os.rename(moved, db_path)
    wait_rows(sqlite_db, 20)
    d.wait_for(lambda s: s["db_ok"] is True, what="db back")
    assert d.stop() == 0


def test_a_callback_bug_that_kills_the_network_thread_is_caught_by_the_watchdog(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db,
                   env={"TENANT_BREAK_CALLBACK": "1"})
    d.wait_connected()
    pub = Publisher(broker.port)
    pub.send("ble/boom/telemetry", b"x")
    pub.wait_acked(1)
    pub.close()
    code = d.wait_exit(timeout=20)
    assert code == 70
    assert "network thread died" in d.log()


def test_sigterm_during_a_flood_exits_0_quickly_and_loses_nothing(host, broker, tenant_db, tmp_path):
    n = 5000
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, tenant_db)
    d.wait_connected()
    pub = Publisher(broker.port)
    for i in range(n):
        pub.send(f"ble/dev-{i % 5}/telemetry", telemetry(i))
    pub.wait_acked(n)
    wait_until(lambda: tenant_db.scalar("select count(*) from sensors_reading") > 300, 30, "consumption")
    t0 = time.monotonic()
    code = d.stop()
    assert code == 0 and time.monotonic() - t0 < 10
    r = subprocess.run(["mosquitto_sub", "-p", str(broker.port), "-t", "mqttd/bnp/status", "-C", "1", "-W", "5"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "offline"
    stored = tenant_db.scalar("select count(*) from sensors_reading")
    d2 = host.start("bnp", cfg, tenant_db)
    wait_rows(tenant_db, n, timeout=90, what="count(distinct seq)")
    d2.wait_for(lambda s: s["backlog"] == 0 and time.time() - (s["last_message_at"] or 0) > 1, what="quiet")
    # Everything committed before the stop was acked: the restart brings no duplicates.
    assert tenant_db.query("select count(*), count(distinct seq) from sensors_reading")[0] == (n, n), stored
    assert d2.stop() == 0
