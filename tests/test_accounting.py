"""Accounting that adds up (docs/operations.md): in the status file, in `status --json` and in /metrics,
received = handled + dead_letters + duplicates_skipped + unrouted + canary + in_flight, at every
moment, with messages of every kind flowing through a real daemon."""
import json
import re
import threading
import time
import urllib.request

from lab.daemon import write_config
from lab.publish import Publisher, telemetry
from lab.waits import wait_rows

OUTCOMES = ("handled", "dead_letters", "duplicates_skipped", "unrouted", "canary", "in_flight")


def adds_up(st: dict) -> bool:
    return st["received"] == sum(st[k] for k in OUTCOMES) and st["in_flight"] >= 0


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    names = {"received": "mqttd_messages_received_total", "handled": "mqttd_messages_handled_total",
             "dead_letters": "mqttd_dead_letters_total", "duplicates_skipped": "mqttd_duplicates_skipped_total",
             "unrouted": "mqttd_messages_unrouted_total", "canary": "mqttd_canary_messages_total",
             "in_flight": "mqttd_in_flight"}
    out = {}
    for key, series in names.items():
        m = re.search(rf"^{series}\{{[^}}]*\}} (\S+)$", text, re.M)
        assert m, f"{series} missing from /metrics"
        out[key] = float(m.group(1))
    return out


def test_every_status_snapshot_and_scrape_adds_up_with_every_kind_of_message(host, broker, sqlite_db, tmp_path):
    # Given a daemon whose session still holds a filter no route serves any more (legacy/#), with
    # two messages queued on it while the daemon was away: they arrive and match no route
    legacy = '[[subscribe]]\ntopic = "legacy/#"\nhandler = "mqttd.inbox"\n'
    d = host.start("bnp", write_config(tmp_path / "old.toml", broker.port, extra=legacy), sqlite_db)
    d.wait_connected()
    assert d.stop() == 0
    pub = Publisher(broker.port)
    pub.send("legacy/a", b"old")
    pub.send("legacy/b", b"old")
    pub.wait_acked(2)
    cfg = write_config(tmp_path / "c.toml", broker.port, canary_interval=0.2)
    d = host.start("bnp", cfg, sqlite_db, "--metrics-port", "0")
    port = d.wait_connected()["metrics_port"]

    # While messages of every kind flow, a poller reads the status file and /metrics as fast as it can
    seen: list[dict] = []
    scrapes: list[dict] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            st = d.status()
            if st.get("pid") == d.pid and "in_flight" in st:
                seen.append(st)
            scrapes.append(_scrape(port))
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    # When 600 good readings, 3 that make the handler raise, 1 bad JSON, a keyed message sent
    # three times (one run, two duplicates) arrive, the canary going round all the while
    sent = 0
    for i in range(600):
        pub.send(f"ble/dev-{i % 5}/telemetry", telemetry(i))
        sent += 1
        if i % 200 == 100:
            pub.send("ble/dev-9/telemetry", telemetry(10_000 + i, fail=True))
            sent += 1
    pub.send("ble/dev-9/telemetry", b"{not json")
    for _ in range(3):
        pub.send("dedupe/dev-1/telemetry", telemetry(7))
    pub.wait_acked(2 + sent + 4)
    wait_rows(sqlite_db, 601)
    final = d.wait_for(lambda s: s["handled"] == 601 and s["duplicates_skipped"] == 2 and s["in_flight"] == 0
                       and s["canary"] >= 3, what="everything settled")
    stop.set()
    poller.join(10)

    # Then every outcome is counted once, and nothing is left in flight
    assert (final["handled"], final["dead_letters"], final["duplicates_skipped"], final["unrouted"]) == (601, 4, 2, 2)
    assert final["received"] == 601 + 4 + 2 + 2 + final["canary"]
    # And the identity held in every snapshot the poller saw, including those taken mid-flood
    assert len(seen) > 20 and len(scrapes) > 20
    assert [s for s in seen if not adds_up(s)] == []
    assert [s for s in scrapes if not adds_up(s)] == []
    assert any(s["in_flight"] > 0 for s in seen + scrapes), "no snapshot caught a message in flight"
    # And `status --json` carries the same counters
    r = host.mqttd("status", "--project", "bnp", "--json")
    row = json.loads(r.stdout)[0]
    assert adds_up(row) and row["handled"] == 601 and row["unrouted"] == 2
    # And after a clean stop, the last status still adds up
    assert d.stop() == 0
    last = json.loads(d.status_path.read_text())
    assert last["state"] == "stopped" and adds_up(last)
    pub.close()
