"""The promise under tenant code nobody here wrote: handlers that break the handler contract
without raising, dead letters no table was sized for, replays of keyed messages, a message set
aside on several routes, and a dead-letter file that cannot be written."""
import json
import shutil
import time

import pytest
from lab.daemon import write_config
from lab.publish import Publisher, telemetry
from lab.waits import wait_rows, wait_until


def _queued(host, broker, cfg, db, env=None):
    """Start the daemon once so that its persistent session exists, then stop it: what is
    published next waits in the session and arrives as one batch when it starts again."""
    d = host.start("bnp", cfg, db, env=env)
    d.wait_connected()
    assert d.stop() == 0


def _letters(db):
    return db.query("select topic, route, error from mqttd_deadletter order by id")


def test_handlers_that_swallow_a_db_error_or_close_the_connection_fail_alone(host, broker, tenant_db, tmp_path):
    # Given 1,000 readings queued with handlers among them that break the contract silently:
    # the insert-or-ignore idiom (11 messages on one tag: the first creates it), connection.close(),
    # close_old_connections() (and then a query that raises) and a raw ROLLBACK (refused: the
    # transaction stays whole)
    env = {"TENANT_CONTRACT": "1"}
    cfg = write_config(tmp_path / "c.toml", broker.port)
    _queued(host, broker, cfg, tenant_db, env)
    pub = Publisher(broker.port)
    bad = {"swallow": 11, "close": 3, "tidy": 2, "closeraise": 2, "rollback": 2}
    n = 0
    for i in range(1000):
        pub.send(f"ble/dev-{i % 5}/telemetry", telemetry(i))
        if i % 50 == 7:
            kind = next(k for k, left in bad.items() if left)
            bad[kind] -= 1
            pub.send(f"contract/{kind}/dev-{i}", {"seq": i, "tag": "gateway-7"})
            n += 1
    pub.wait_acked(1000 + n)
    pub.close()
    assert n == 20
    # when the daemon starts
    d = host.start("bnp", cfg, tenant_db, env=env)
    st = d.wait_for(lambda s: s["acked"] >= 1020, timeout=60, what="all acked")
    # then every reading is stored, the first tag message too, and each of the other 19 is a dead
    # letter that says what its handler did and how to fix it
    wait_rows(tenant_db, 1000, where="source = 'single'", what="count(distinct seq)")
    assert tenant_db.scalar("select count(*) from sensors_reading where source = 'single'") == 1000
    assert tenant_db.scalar("select count(*) from sensors_reading where source = 'swallow'") == 1
    assert tenant_db.scalar("select count(*) from sensors_reading where source in "
                            "('close', 'tidy', 'closeraise', 'rollback')") == 0
    letters = _letters(tenant_db)
    assert len(letters) == 19 and st["dead_letters"] == 19, letters
    by_kind = {k: [e for t, _, e in letters if t.startswith(f"contract/{k}/")] for k in bad}
    assert len(by_kind["swallow"]) == 10 and len(by_kind["close"]) == 3 and len(by_kind["closeraise"]) == 2
    assert all("swallowed a database error" in e and "transaction.atomic()" in e for e in by_kind["swallow"])
    assert all("closed the database connection" in e for e in by_kind["close"] + by_kind["tidy"] + by_kind["closeraise"])
    assert all("and then raised" in e for e in by_kind["closeraise"])
    assert all("tried to end the batch transaction itself (ROLLBACK); refused" in e for e in by_kind["rollback"])
    assert all(e.startswith("HandlerContractError: handler sensors.mqtt_handlers.") for _, _, e in letters)
    assert d.proc.poll() is None and d.stop() == 0


def test_a_raising_on_commit_hook_and_a_foreign_key_checked_at_commit_neither_wedge_nor_repeat(
        host, broker, tenant_db, tmp_path):
    # Given queued messages whose handlers register an on_commit hook that raises (it runs after
    # the COMMIT), and one whose row has a foreign key to nothing (checked only at COMMIT)
    env = {"TENANT_CONTRACT": "1"}
    cfg = write_config(tmp_path / "c.toml", broker.port)
    _queued(host, broker, cfg, tenant_db, env)
    pub = Publisher(broker.port)
    for i in range(20):
        pub.send(f"ble/dev-{i % 2}/telemetry", telemetry(i))
        if i % 5 == 0:
            pub.send(f"contract/oncommit/dev-{i}", {"seq": i})
    pub.send("contract/fk/dev-1", {"seq": 99})
    pub.wait_acked(25)
    pub.close()
    # when the daemon starts
    d = host.start("bnp", cfg, tenant_db, env=env)
    st = d.wait_for(lambda s: s["acked"] >= 25, timeout=60, what="all acked")
    # then the batch committed once: every reading once, the hooks' failure only logged, and the
    # dangling key a dead letter with the constraint's error
    assert tenant_db.query("select count(*), count(distinct seq) from sensors_reading where source = 'single'")[0] == (20, 20)
    assert tenant_db.scalar("select count(*) from sensors_reading where source = 'oncommit'") == 4
    letters = _letters(tenant_db)
    assert [t for t, _, _ in letters] == ["contract/fk/dev-1"] and "IntegrityError" in letters[0][2], letters
    assert st["dead_letters"] == 1 and d.proc.poll() is None and d.stop() == 0


def test_dead_letters_with_a_huge_topic_or_nul_in_the_error_are_stored_and_the_stream_goes_on(
        host, broker, tenant_db, tmp_path):
    # Given a route on a very long topic whose handler raises, an error text with a NUL in it, and
    # the built-in inbox receiving a 60,000-byte topic
    long_device = "d" * 5000
    cfg = write_config(tmp_path / "c.toml", broker.port,
                       extra='[[subscribe]]\ntopic = "inbox/#"\nhandler = "mqttd.inbox"\n')
    d = host.start("bnp", cfg, tenant_db)
    d.wait_connected()
    pub = Publisher(broker.port)
    pub.send(f"ble/{long_device}/telemetry", telemetry(1, fail=True))
    pub.send("ble/dev-1/telemetry", {"seq": "nul\x00inside", "fail": True})
    pub.send("inbox/" + "x" * 60000, b"raw")
    for i in range(10, 20):
        pub.send("ble/dev-2/telemetry", telemetry(i))
        pub.send(f"inbox/dev-{i}", b"raw")
    pub.wait_acked(23)
    pub.close()
    # then the daemon is not wedged: everything after them is stored and everything is acked
    st = d.wait_for(lambda s: s["acked"] >= 23, timeout=30, what="all acked")
    wait_rows(tenant_db, 10)
    assert tenant_db.scalar("select count(*) from mqttd_inboxmessage where substr(topic, 1, 10) = 'inbox/dev-'") == 10
    letters = _letters(tenant_db)
    topics = [t for t, _, _ in letters]
    assert f"ble/{long_device}/telemetry" in topics
    assert any("nul\\x00inside" in e for _, _, e in letters)        # the NUL kept, escaped
    # the long inbox topic is an inbox row (SQLite) or, past PostgreSQL's index limit, a dead letter
    stored = tenant_db.scalar("select count(*) from mqttd_inboxmessage where length(topic) > 60000")
    assert stored + sum(1 for t in topics if len(t) > 60000) == 1
    assert st["db_ok"] is True and d.proc.poll() is None and d.stop() == 0


@pytest.mark.parametrize("order", ["redelivery_then_replay", "replay_then_redelivery"])
def test_replay_keeps_the_exactly_once_effect_of_a_dedupe_key(host, broker, sqlite_db, tmp_path, order):
    # Given a keyed message (dedupe on device + seq) whose handler failed: a dead letter
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    pub = Publisher(broker.port)
    pub.send("dedupe/dev-1/telemetry", telemetry(7, fail=True))
    pub.wait_acked(1)
    wait_rows(sqlite_db, 1, table="mqttd_deadletter")
    assert d.stop() == 0
    fixed = {"TENANT_FIXED": "1"}

    def redeliver():
        d = host.start("bnp", cfg, sqlite_db, env=fixed)
        d.wait_connected()
        pub.send("dedupe/dev-1/telemetry", telemetry(7))       # the publisher sends it again
        pub.wait_acked(2)
        d.wait_for(lambda s: s["handled"] + s["duplicates_skipped"] >= 1, what="settled")   # a duplicate after a replay
        assert d.stop() == 0

    def replay():
        r = host.mqttd("replay", "--project", "bnp", "--config", str(cfg), db=sqlite_db, env=fixed)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    # when the bug is fixed and the message arrives again and the letter is replayed, in either order
    if order == "redelivery_then_replay":
        redeliver()
        out = replay()
        assert "duplicate" in out
    else:
        out = replay()
        assert ": ok, deleted" in out
        redeliver()
    pub.close()
    # then its effect exists once, and the letter is gone
    assert sqlite_db.scalar("select count(*) from sensors_reading where source = 'dedupe'") == 1
    assert sqlite_db.scalar("select count(*) from mqttd_deadletter") == 0


def test_a_message_set_aside_whole_is_a_dead_letter_for_each_route_and_replays_each(host, broker, sqlite_db, tmp_path):
    # Given a topic with two routes (one keyed, one not) and a payload over dispatch.max_payload
    env = {"TENANT_OVERLAP": "1"}
    cfg = write_config(tmp_path / "c.toml", broker.port, extra="[dispatch]\nmax_payload = 200\n")
    d = host.start("bnp", cfg, sqlite_db, env=env)
    d.wait_connected()
    pub = Publisher(broker.port)
    pub.send("dedupe/dev-1/telemetry", telemetry(3, pad="x" * 300))
    pub.wait_acked(1)
    pub.close()
    # (the status counts messages: one message, settled as a dead letter, with a letter per route)
    d.wait_for(lambda s: s["dead_letters"] == 1 and s["in_flight"] == 0, what="the message dead-lettered")
    assert d.stop() == 0
    # then there is one letter per route, each naming it
    letters = _letters(sqlite_db)
    assert sorted(r for _, r, _ in letters) == ["sensors.mqtt_handlers.save_every_copy", "sensors.mqtt_handlers.save_once"]
    assert all("max_payload" in e for _, _, e in letters)
    # and a replay runs each route once
    r = host.mqttd("replay", "--project", "bnp", "--config", str(cfg), db=sqlite_db, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(x for (x,) in sqlite_db.query("select source from sensors_reading")) == ["dedupe", "every"]


def test_a_dead_letter_file_that_cannot_be_written_holds_the_acks_until_it_can(host, broker, sqlite_db, tmp_path):
    # Given a tenant without mqttd's app (dead letters go to deadletter.jsonl) whose file cannot
    # be written (a directory stands in its place)
    env = {"TENANT_NO_MQTTD_APP": "1"}
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, sqlite_db, env=env)
    d.wait_connected()
    jsonl = host.log_dir / "bnp" / "deadletter.jsonl"
    jsonl.mkdir(parents=True)
    (jsonl / "in-the-way").write_text("")
    # when a batch with a failing message commits
    pub = Publisher(broker.port)
    for i in range(5):
        pub.send("ble/dev-1/telemetry", telemetry(i, fail=i == 2))
    pub.wait_acked(5)
    # then nothing of it is acked while the letter cannot be stored, and the status says why
    st = d.wait_for(lambda s: s.get("deadletter_error"), what="dead-letter file error in the status")
    assert "deadletter.jsonl" in st["deadletter_error"] and st["acked"] == 0
    time.sleep(1)
    assert d.status()["acked"] == 0
    # and once the file can be written, the letter is there and everything is acked, in order
    shutil.rmtree(jsonl)
    st = d.wait_for(lambda s: s["acked"] >= 5 and s["deadletter_error"] is None, timeout=30, what="acked")
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(lines) == 1 and "told to fail (seq 2)" in lines[0]["error"]
    assert sqlite_db.scalar("select count(*) from sensors_reading") == 4
    pub.send("ble/dev-1/telemetry", telemetry(9))
    pub.wait_acked(6)
    pub.close()
    wait_rows(sqlite_db, 5)
    assert d.stop() == 0


def test_an_outage_in_the_careful_pass_is_not_taken_for_a_hung_handler(host, broker, sqlite_db, tmp_path):
    # Given a batch in which a per-message handler raises (so the careful pass runs) and a batch
    # handler hits a database error that looks like an outage, with a short handler timeout
    cfg = write_config(tmp_path / "c.toml", broker.port, extra="[dispatch]\nhandler_timeout = 1.5\n")
    _queued(host, broker, cfg, sqlite_db)
    pub = Publisher(broker.port)
    pub.send("ble/dev-1/telemetry", telemetry(1, fail=True))
    for i in range(10, 15):
        pub.send("bulk/dev-2/telemetry", telemetry(i, operational=i == 12))
    pub.wait_acked(6)
    pub.close()
    # when the daemon retries it as an outage (backoff 0.2 s, doubling) for longer than the timeout
    d = host.start("bnp", cfg, sqlite_db)
    # then it is not killed by the watchdog, nothing is poisoned, and once the database is known to
    # answer, the error is blamed on its message: the good neighbours are stored
    st = d.wait_for(lambda s: s["acked"] >= 6, timeout=40, what="all acked")
    assert d.proc.poll() is None
    wait_rows(sqlite_db, 4, where="source = 'bulk'")
    errors = sorted(e for _, _, e in _letters(sqlite_db))
    assert len(errors) == 2 and "simulated" in errors[0] + errors[1] and "HandlerTimeout" not in "".join(errors)
    assert st["db_retries"] >= 1 and "hung" not in d.log()
    assert d.stop() == 0


@pytest.mark.postgres
def test_a_handler_waiting_on_a_lock_past_the_timeout_is_cancelled_and_retried_not_poisoned(host, broker, pg_db, tmp_path):
    import psycopg
    from lab.db import PG

    # Given another transaction holding the unique key a handler is about to insert
    cfg = write_config(tmp_path / "c.toml", broker.port, extra="[dispatch]\nhandler_timeout = 1.5\n")
    d = host.start("bnp", cfg, pg_db)
    d.wait_connected()
    blocker = psycopg.connect(dbname=pg_db.name, **PG)
    blocker.execute("insert into sensors_strict (code) values ('locked')")
    try:
        # when a message needs that key, and waits on the lock longer than the handler timeout
        pub = Publisher(broker.port)
        pub.send("strict/locked", b"")
        pub.wait_acked(1)
        wait_until(lambda: "cancelled the query" in d.log(), 20, "the query cancelled")
        time.sleep(1)
        assert d.proc.poll() is None
    finally:
        blocker.rollback()          # the other transaction ends without the row
        blocker.close()
    # then the retry stores it: no restart, no dead letter
    wait_rows(pg_db, 1, table="sensors_strict", timeout=30)
    st = d.wait_for(lambda s: s["acked"] >= 1, what="acked")
    assert st["dead_letters"] == 0 and pg_db.scalar("select count(*) from mqttd_deadletter") == 0
    pub.close()
    assert d.stop() == 0


def test_garbage_on_the_canary_topic_and_an_unwritable_poison_list_never_stop_the_daemon(host, broker, sqlite_db, tmp_path):
    # Given a running daemon whose poison list remembers a message that hung in a batch handler
    from mqttd.ingest.poison import Record, fingerprint
    from mqttd.message import Message

    cfg = write_config(tmp_path / "c.toml", broker.port)
    host.run_dir.mkdir(parents=True, exist_ok=True)
    suspect = json.dumps(telemetry(5)).encode()
    poison = host.run_dir / "bnp.poison.json"
    fp = fingerprint(Message("bulk/dev-1/telemetry", suspect))
    poison.write_text(json.dumps([vars(Record("sensors.mqtt_handlers.save_many", "bulk/dev-1/telemetry", fp,
                                              False, time.time(), 60.0))]))
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    poison.unlink()
    poison.mkdir()                                     # the list can no longer be saved
    (poison / "in-the-way").write_text("")
    # when someone publishes garbage on the canary topic, and the suspect arrives
    pub = Publisher(broker.port)
    for payload in (b'{"sent": ' + b"9" * 400 + b"}", b'{"sent": NaN}', b"\xff\xfe", b"[" * 5000, b'{"sent": "x"}'):
        pub.send("mqttd/bnp/canary", payload)
    pub.send("bulk/dev-1/telemetry", suspect)
    pub.send("ble/dev-1/telemetry", telemetry(6))
    pub.wait_acked(7)
    pub.close()
    # then the daemon stays up, stores the messages, acks everything and its own canary still works
    wait_rows(sqlite_db, 2)
    before = d.status()["canary_at"] or 0
    d.wait_for(lambda s: s["acked"] >= 7 and (s["canary_at"] or 0) > before, timeout=20, what="acked, canary")
    assert d.proc.poll() is None and d.stop() == 0
