#!/usr/bin/env python3
"""What gap detection costs on the batch route (issue 13.4: under 5%), as an A/B in one run.

The same N QoS 1 messages of the batch=True route (``bulk/{device}/telemetry``, bulk_create) are
queued at a private mosquitto over MQTT 5 for a persistent session, once *stamped* as
``mqttd.publish`` stamps them (``mqttd-pub``, ``mqttd-seq``: the daemon parses them and merges the
ranges in each batch's transaction) and once *unstamped* (no user properties: nothing recorded);
then the daemon drains them. Rate = N / (first row committed -> last row committed), as in
scripts/bench; the rounds alternate (A B A B ...) and the median of each is reported, so a slower
minute of this shared machine falls on both.

  python scripts/bench_gaps.py [-n 20000] [--rounds 3] [--db sqlite,postgres]
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))     # lab: the parts shared with the tests
_loader = importlib.machinery.SourceFileLoader("mqttd_bench", str(ROOT / "scripts" / "bench"))
_spec = importlib.util.spec_from_loader("mqttd_bench", _loader)
assert _spec is not None
bench = importlib.util.module_from_spec(_spec)
_loader.exec_module(bench)

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from lab.broker import Broker  # noqa: E402
from lab.daemon import write_config  # noqa: E402
from lab.db import pg_available  # noqa: E402
from lab.publish import ble_payload  # noqa: E402


def queue(port: int, n: int, stamped: bool) -> None:
    """Queue ``n`` batch-route messages over MQTT 5, with or without the stamp (confirmed)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.max_inflight_messages_set(2000)
    acked = [0]
    lock = threading.Lock()

    def on_pub(*a: object) -> None:
        with lock:
            acked[0] += 1

    c.on_publish = on_pub
    c.connect("127.0.0.1", port)
    c.loop_start()
    pub = f"bench-pub-{time.monotonic_ns()}"
    for i in range(n):
        props = None
        if stamped:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("mqttd-pub", pub), ("mqttd-seq", str(i + 1))]
        c.publish(f"bulk/ble-{i % bench.DEVICES + 1:04d}/telemetry", ble_payload(i), qos=1, properties=props)
        while i - acked[0] > 20_000:
            time.sleep(0.01)
    t0 = time.monotonic()
    while acked[0] < n and time.monotonic() - t0 < 300:
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
    assert acked[0] == n, f"only {acked[0]}/{n} confirmed"


def one_run(broker: Broker, kind: str, n: int, stamped: bool, tmp: Path) -> dict:
    db = bench.new_db(kind, tmp, f"gaps-{kind}-{time.monotonic_ns()}")
    try:
        project = f"gapbench{time.monotonic_ns() % 10**9}"
        cfg = write_config(tmp / f"{project}.toml", broker.port, keepalive=30)
        cid = f"{project}-{bench.os.uname().nodename.split('.')[0]}"
        bench.precreate_session(broker.port, cid, "bulk/+/telemetry", v5=True)
        queue(broker.port, n, stamped)
        proc = bench.start_mqttd(project, cfg, db, tmp)
        try:
            t_first, t_last = bench.Observer(db, "bulk", n, "sensors_reading", proc).run(900)
            # CPU of the daemon, start-up included (the same in both: the difference is the stamps')
            cpu = bench.cpu_seconds(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        ok = db.scalar("select count(distinct seq) from sensors_reading where source = 'bulk'") == n
        ranges = db.scalar("select count(*) from mqttd_publisherrange")
        return {"rate": n / (t_last - t_first), "cpu": cpu, "ok": ok and ranges == (1 if stamped else 0),
                "ranges": ranges}
    finally:
        db.drop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--db", default="sqlite,postgres")
    args = ap.parse_args()
    dbs = [d for d in args.db.split(",") if d and (d != "postgres" or pg_available())]
    ok = True
    with tempfile.TemporaryDirectory(prefix="mqttd-bench-gaps-") as t:
        tmp = Path(t)
        broker = Broker(tmp / "broker", persistence=False, extra="max_inflight_messages 1000").start()
        try:
            for kind in dbs:
                rates: dict[bool, list[float]] = {True: [], False: []}
                cpus: dict[bool, list[float]] = {True: [], False: []}
                for r in range(args.rounds):
                    for stamped in (False, True) if r % 2 == 0 else (True, False):
                        row = one_run(broker, kind, args.n, stamped, tmp)
                        ok &= row["ok"]
                        rates[stamped].append(row["rate"])
                        cpus[stamped].append(row["cpu"])
                        print(f"  {kind} round {r + 1} {'stamped' if stamped else 'unstamped'}: "
                              f"{row['rate']:,.0f} msg/s, daemon CPU {row['cpu']:.2f} s "
                              f"(ranges stored: {row['ranges']}, ok: {row['ok']})", flush=True)
                a, b = statistics.median(rates[False]), statistics.median(rates[True])
                ca, cb = statistics.median(cpus[False]), statistics.median(cpus[True])
                print(f"batch route / {kind}, N = {args.n:,}, median of {args.rounds}: unstamped {a:,.0f} msg/s, "
                      f"stamped (gap detection) {b:,.0f} msg/s: cost {100 * (a - b) / a:+.1f}%; daemon CPU "
                      f"{ca:.2f} s vs {cb:.2f} s: {1e6 * (cb - ca) / args.n:+.1f} us a message", flush=True)
        finally:
            broker.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
