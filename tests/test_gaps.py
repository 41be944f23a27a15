"""Gap detection, the daemon's side (docs/operations.md): messages a broker accepted from ``mqttd.publish``
and then dropped are counted as ``publisher_gaps``, from the stamps that did arrive.

The proof runs a real mosquitto whose ``max_queued_messages`` drops what an offline subscriber
cannot queue, and the real daemon; the range arithmetic is tested on its own at the end."""
from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
import urllib.request

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from lab.broker import Broker
from lab.daemon import write_config
from lab.publish import telemetry
from lab.waits import wait_rows, wait_until

from mqttd.config import BrokerConfig
from mqttd.ingest.gaps import Holes, Row, holes, merge, ranges_of
from mqttd.publisher import Publisher


def _config(path, port: int):  # noqa: ANN001, ANN202
    # write_config's [status] table gets the settle window (TOML: one table, so it is patched in).
    cfg = write_config(path, port)
    cfg.write_text(cfg.read_text().replace("[status]\n", "[status]\ngap_settle_s = 2\n", 1))
    return cfg


def _publisher(port: int, project: str = "web") -> Publisher:
    """The tenant's publisher over MQTT 5: only then does it stamp its messages."""
    return Publisher(BrokerConfig(host="127.0.0.1", port=port, protocol="5", reconnect_min=0.1, reconnect_max=1.0),
                     project=project, timeout=30)


def _send(pub: Publisher, first: int, n: int) -> None:
    pub.publish_many([(f"ble/dev-{i % 3}/telemetry", json.dumps(telemetry(i))) for i in range(first, first + n)], qos=1)


def _metric(port: int, name: str) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return [line for line in r.read().decode().splitlines() if line.startswith(name + "{")]


def _settled_rows(db, quiet: float = 2.0) -> int:  # noqa: ANN001
    """The row count once it has not changed for ``quiet`` seconds (the broker's queue drained)."""
    n, since = -1, time.monotonic()
    while True:
        now_n = db.scalar("select count(*) from sensors_reading")
        if now_n != n:
            n, since = now_n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return n
        time.sleep(0.2)


def test_a_publisher_whose_messages_all_arrive_shows_no_gaps(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", _config(tmp_path / "c.toml", broker.port), sqlite_db, "--metrics-port", "0")
    st = d.wait_for(lambda s: s.get("connected") and s.get("metrics_port"), what="connected")
    assert st["gap_detection"] == "on"
    pub = _publisher(broker.port)
    _send(pub, 0, 300)
    wait_rows(sqlite_db, 300)
    # Past the settle window, and a count taken after it: still nothing missing.
    time.sleep(4.5)
    st = d.wait_for(lambda s: s["handled"] >= 300, what="settled")
    assert st["publisher_gaps"] == 0
    assert sqlite_db.scalar("select count(*) from mqttd_publisherrange") == 1     # one range: 1..300
    assert _metric(st["metrics_port"], "mqttd_publisher_gaps_total") == [
        'mqttd_publisher_gaps_total{mqttd_instance="",project="bnp"} 0.0']
    pub.close()
    assert d.stop() == 0


def test_messages_the_broker_dropped_are_counted_exactly(host, sqlite_db, tmp_path):
    # Given a broker that queues at most 100 messages for an offline subscriber, and drops the rest
    mq = Broker(tmp_path / "mq", extra="max_queued_messages 100\nqueue_qos0_messages false").start()
    try:
        cfg = _config(tmp_path / "c.toml", mq.port)
        d = host.start("bnp", cfg, sqlite_db, "--metrics-port", "0")
        d.wait_for(lambda s: s.get("connected"), what="connected")
        assert d.stop() == 0                          # its persistent session stays at the broker
        # When the publisher sends 250 while the daemon is away (all accepted by the broker) ...
        pub = _publisher(mq.port)
        _send(pub, 0, 250)
        d = host.start("bnp", cfg, sqlite_db, "--metrics-port", "0")
        d.wait_for(lambda s: s.get("connected"), what="connected again")
        wait_rows(sqlite_db, 1)
        stored = _settled_rows(sqlite_db)
        # ... and once more after the drop (a hole at the very end shows only when the publisher sends again)
        _send(pub, 250, 1)
        wait_rows(sqlite_db, stored + 1)
        dropped = 251 - (stored + 1)
        print(f"stored {stored} of 250, dropped {dropped}")
        assert dropped >= 100, f"the broker was meant to drop ~150 of 250, stored {stored}"
        # Then, past the settle window, exactly what the broker dropped is reported
        st = d.wait_for(lambda s: s.get("publisher_gaps") == dropped, timeout=20, what=f"{dropped} gaps")
        assert _metric(st["metrics_port"], "mqttd_publisher_gaps_total") == [
            f'mqttd_publisher_gaps_total{{mqttd_instance="",project="bnp"}} {float(dropped)}']
        # and it survives a restart: the count is the table's, not the process's memory
        assert d.stop() == 0
        d = host.start("bnp", cfg, sqlite_db)
        d.wait_for(lambda s: s.get("connected") and s.get("publisher_gaps") == dropped, what="the same after restart")
        pub.close()
        assert d.stop() == 0
    finally:
        mq.stop()


def test_without_the_mqttd_app_gap_detection_is_off_and_says_why(host, broker, sqlite_db, tmp_path):
    # Given a tenant that did not install mqttd's app (dead letters to deadletter.jsonl)
    d = host.start("bnp", _config(tmp_path / "c.toml", broker.port), sqlite_db, "--metrics-port", "0",
                   env={"TENANT_NO_MQTTD_APP": "1"})
    st = d.wait_for(lambda s: s.get("connected") and s.get("metrics_port"), what="connected")
    # When stamped messages arrive, they are stored, and nothing is counted or exported
    pub = _publisher(broker.port)
    _send(pub, 0, 20)
    wait_rows(sqlite_db, 20)
    st = d.wait_for(lambda s: s["handled"] >= 20, what="handled")
    assert st["gap_detection"].startswith("off: the mqttd app is not installed") and st["publisher_gaps"] is None
    assert _metric(st["metrics_port"], "mqttd_publisher_gaps_total") == []
    pub.close()
    assert d.stop() == 0


def _insert_ranges(db, rows: list[tuple[str, int, int, dt.datetime, dt.datetime]]) -> None:  # noqa: ANN001
    """Rows of mqttd_publisherrange for project bnp, as an earlier week of the daemon left them."""
    def ts(t: dt.datetime) -> str:       # Django's SQLite datetime text (UTC, USE_TZ)
        return t.astimezone(dt.UTC).replace(tzinfo=None).isoformat(sep=" ")

    with sqlite3.connect(db.name) as conn:
        conn.executemany("insert into mqttd_publisherrange (project, pub, first, last, first_seen_at, last_seen_at) "
                         "values ('bnp', ?, ?, ?, ?, ?)", [(p, a, b, ts(f), ts(la)) for p, a, b, f, la in rows])


def test_publishers_long_silent_with_nothing_missing_are_forgotten_and_the_count_stays(host, broker, sqlite_db,
                                                                                        tmp_path):
    # Given a week's worth of publishing processes: one complete and long silent (old-whole), one
    # long silent with a hole of 10 (old-holed: 1..50, 61..90), one complete and recent (new-whole)
    now = dt.datetime.now(dt.UTC)
    weeks_ago, hour_ago = now - dt.timedelta(days=8), now - dt.timedelta(hours=1)
    _insert_ranges(sqlite_db, [("old-whole", 1, 500, weeks_ago, weeks_ago),
                               ("old-holed", 1, 50, weeks_ago, weeks_ago),
                               ("old-holed", 61, 90, weeks_ago, weeks_ago),
                               ("new-whole", 1, 70, hour_ago, hour_ago)])
    # When the daemon starts (it prunes at start, then hourly)
    d = host.start("bnp", _config(tmp_path / "c.toml", broker.port), sqlite_db)
    d.wait_for(lambda s: s.get("connected") and s.get("publisher_gaps") is not None, what="the first count")
    wait_until(lambda: sqlite_db.scalar("select count(*) from mqttd_publisherrange where pub = 'old-whole'") == 0,
               timeout=20, what="the long-silent complete publisher forgotten")
    # Then only that one is gone: the holed one still carries its 10, the recent one stays
    pubs = sqlite_db.query("select pub, first, last from mqttd_publisherrange order by pub, first")
    assert pubs == [("new-whole", 1, 70), ("old-holed", 1, 50), ("old-holed", 61, 90)]
    assert d.wait_for(lambda s: s.get("publisher_gaps") == 10, what="the count unchanged")["publisher_gaps"] == 10
    assert "forgot 1 publisher id(s)" in d.log()
    # and a live publisher's range records its last arrival (what the pruning reads)
    pub = _publisher(broker.port, project="web")
    _send(pub, 0, 20)
    wait_rows(sqlite_db, 20)
    pub.close()
    seen = sqlite_db.scalar("select last_seen_at from mqttd_publisherrange where pub like 'web-%'")
    assert seen is not None and seen >= now.replace(tzinfo=None).isoformat(sep=" ")[:19]
    assert d.stop() == 0


def _forged(port: int, pub_id: str, seqs: list[int]) -> None:
    """Stamped messages as mqttd.publish would send them, with chosen numbers (a hole at will)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for s in seqs:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("mqttd-pub", pub_id), ("mqttd-seq", str(s))]
            c.publish(f"ble/dev-{s % 2}/telemetry", json.dumps(telemetry(s)), qos=1,
                      properties=props).wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def test_two_instances_share_one_count(host, broker, pg_db, tmp_path):
    # Given two instances of one project sharing the load ($share/bnp/...) on PostgreSQL
    cfg = _config(tmp_path / "c.toml", broker.port)
    d1 = host.start("bnp", cfg, pg_db, "--instance", "1")
    d2 = host.start("bnp", cfg, pg_db, "--instance", "2")
    for d in (d1, d2):
        d.wait_for(lambda s: s.get("connected") and s.get("canary_at"), what="connected")
    # When a publisher's 400 messages are split between them, nothing is missing ...
    pub = _publisher(broker.port)
    _send(pub, 0, 400)
    wait_rows(pg_db, 400)
    for d in (d1, d2):
        d.wait_for(lambda s: s["handled"] > 0, what="both took a share")
    # ... and a publisher with 3 numbers missing (1, 2, 6 then 9: 3, 4, 5, 7, 8 missing) counts 5 in both
    _forged(broker.port, "forged-pub-1", [1, 2, 6, 9])
    wait_rows(pg_db, 404)
    for d in (d1, d2):
        d.wait_for(lambda s: s.get("publisher_gaps") == 5, timeout=20, what="5 gaps in each instance")
    pub.close()
    assert d1.stop() == 0 and d2.stop() == 0


# ---- the range arithmetic ----------------------------------------------------------------------------
T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)


def _apply(rows: list[Row], new: list[tuple[int, int]], now: dt.datetime) -> list[Row]:
    """What the table holds after a merge (ids made up for inserted rows)."""
    change = merge(rows, new, now)
    by_id = {r.id: r for r in rows if r.id not in change.delete}
    for r in change.update:
        by_id[r.id] = r
    next_id = max([r.id or 0 for r in rows] + [0]) + 1
    for r in change.insert:
        by_id[next_id] = Row(next_id, r.first, r.last, r.first_seen_at)
        next_id += 1
    return sorted(by_id.values(), key=lambda r: r.first)


def _count(rows: list[Row], now: dt.datetime, settle_s: float = 60) -> int:
    return holes([("p", r.first, r.last, r.first_seen_at) for r in rows], now - dt.timedelta(seconds=settle_s)).gaps


def test_a_hole_counts_after_the_settle_window_and_stops_when_filled_late():
    assert ranges_of([5, 1, 2, 3, 3, 7]) == [(1, 3), (5, 5), (7, 7)]
    # Given 1..100 and then 251 (150 missing)
    rows = _apply([], [(1, 100)], T0)
    rows = _apply(rows, [(251, 251)], T0 + dt.timedelta(seconds=10))
    # Then the hole waits for the settle window before it counts
    assert _count(rows, T0 + dt.timedelta(seconds=30)) == 0
    assert _count(rows, T0 + dt.timedelta(seconds=71)) == 150
    # When a late redelivery brings 101..200 (and 250), the rest of the hole still counts ...
    rows = _apply(rows, [(101, 200), (250, 250)], T0 + dt.timedelta(seconds=100))
    assert _count(rows, T0 + dt.timedelta(seconds=101)) == 49
    # ... and once all of it has come, nothing does: the ranges join into one
    rows = _apply(rows, [(201, 249)], T0 + dt.timedelta(seconds=102))
    assert _count(rows, T0 + dt.timedelta(seconds=500)) == 0
    assert [(r.first, r.last, r.first_seen_at) for r in rows] == [(1, 251, T0)]


def test_the_counter_knows_when_the_next_hole_settles_so_an_idle_project_is_not_polled():
    # Given 1..100 at T0, then 251 at T0+10 s and 300 at T0+20 s (two holes, neither settled at T0+30 s)
    rows = _apply([], [(1, 100)], T0)
    rows = _apply(rows, [(251, 251)], T0 + dt.timedelta(seconds=10))
    rows = _apply(rows, [(300, 300)], T0 + dt.timedelta(seconds=20))
    as_rows = [("p", r.first, r.last, r.first_seen_at) for r in rows]
    # Then the count is 0 and the next look is due when the earlier hole settles (its range came at T0+10 s)
    found = holes(as_rows, T0 + dt.timedelta(seconds=30) - dt.timedelta(seconds=60))
    assert (found.gaps, found.next_settle) == (0, T0 + dt.timedelta(seconds=10))
    # and once that one counts, the next due is the later hole's
    found = holes(as_rows, T0 + dt.timedelta(seconds=75) - dt.timedelta(seconds=60))
    assert (found.gaps, found.next_settle) == (150, T0 + dt.timedelta(seconds=20))
    # and once every hole counts, nothing is due: the counter sleeps until a commit (or its fallback)
    assert holes(as_rows, T0 + dt.timedelta(seconds=90) - dt.timedelta(seconds=60)) == Holes(150 + 48, None)


def test_redeliveries_change_nothing_and_overlapping_rows_count_once():
    rows = _apply([], [(1, 50)], T0)
    assert merge(rows, [(10, 20)], T0 + dt.timedelta(seconds=5)) == merge(rows, [], T0)   # no change at all
    # Two instances that inserted the same numbers at once (neither saw the other's row)
    twice = [Row(1, 1, 50, T0), Row(2, 40, 60, T0), Row(3, 70, 80, T0)]
    assert _count(twice, T0 + dt.timedelta(hours=1)) == 9          # 61..69, counted once
    # and the next merge that touches them folds them into one row
    assert [(r.first, r.last) for r in _apply(twice, [(61, 69)], T0)] == [(1, 80)]


def test_numbers_before_the_first_seen_and_after_the_last_are_not_counted():
    # A publisher that sent 1..9 before this project subscribed: those were never ours to miss;
    # a drop after 15 shows only when it sends again.
    rows = _apply([], ranges_of([10, 11, 15]), T0)
    assert _count(rows, T0 + dt.timedelta(hours=1)) == 3


def test_a_received_messages_stamp_reads_the_same_straight_from_paho():
    # The daemon reads every message's stamp from paho's Properties without building the whole
    # properties dict (measured: ~80 us a message): the same answer either way.
    from mqttd.message import Message
    from mqttd.mqtt import stamp

    def received(packed: bytes) -> Message:
        raw = Properties(PacketTypes.PUBLISH)
        raw.unpack(packed)
        return Message("ble/d/telemetry", b"{}", 1, raw_properties=raw)

    msg = received(stamp.Stamp.of("web-pub-h-1-ab", 42).pack())
    assert msg.user_properties == {"mqttd-pub": "web-pub-h-1-ab", "mqttd-seq": "42"}
    assert stamp.read(msg.user_properties) == ("web-pub-h-1-ab", 42)
    assert msg.properties["UserProperty"] == [("mqttd-pub", "web-pub-h-1-ab"), ("mqttd-seq", "42")]
    assert msg.user_properties == {"mqttd-pub": "web-pub-h-1-ab", "mqttd-seq": "42"}     # via the dict now
    plain = received(Properties(PacketTypes.PUBLISH).pack())
    assert plain.user_properties == {} and stamp.read(plain.user_properties) is None
    assert Message("a", b"").user_properties == {}                                        # MQTT 3.1.1
