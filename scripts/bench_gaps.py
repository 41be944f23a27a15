#!/usr/bin/env python3
"""What gap detection costs on the batch route (issue 13.4: under 5%), as an A/B/C in one run.

The same N QoS 1 messages of the batch=True route (``bulk/{device}/telemetry``, bulk_create) are
queued at a private mosquitto over MQTT 5 for a persistent session, then the daemon drains them,
in three arms:

- *unstamped*: no user properties;
- *decoy*: two user properties of exactly the stamp's size under other names (``other-pub``,
  ``other-seq``): the broker and the daemon carry and decode the same bytes, nothing is recorded;
- *stamped*: as ``mqttd.publish`` stamps them (``mqttd-pub``, ``mqttd-seq``): also parsed and
  merged into the ranges in each batch's transaction.

So unstamped -> decoy is what carrying the stamp costs (the broker's work included: it shares the
machine's cores), decoy -> stamped what recording it costs mqttd. Rate = N / (first row committed
-> last row committed), as in scripts/bench; CPU seconds of the daemon (start-up included, the
same in every arm) and of the broker while it delivers. The rounds rotate the arms' order and the
median of each is reported, so a slower minute of this shared machine falls on all three.

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


ARMS = ("unstamped", "decoy", "stamped")
NAMES = {"decoy": ("other-pub", "other-seq"), "stamped": ("mqttd-pub", "mqttd-seq")}


def queue(port: int, n: int, arm: str) -> None:
    """Queue ``n`` batch-route messages over MQTT 5, with the arm's user properties (confirmed)."""
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
        if arm in NAMES:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [(NAMES[arm][0], pub), (NAMES[arm][1], str(i + 1))]
        c.publish(f"bulk/ble-{i % bench.DEVICES + 1:04d}/telemetry", ble_payload(i), qos=1, properties=props)
        while i - acked[0] > 20_000:
            time.sleep(0.01)
    t0 = time.monotonic()
    while acked[0] < n and time.monotonic() - t0 < 300:
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
    assert acked[0] == n, f"only {acked[0]}/{n} confirmed"


def one_run(broker: Broker, kind: str, n: int, arm: str, tmp: Path) -> dict:
    db = bench.new_db(kind, tmp, f"gaps-{kind}-{time.monotonic_ns()}")
    try:
        project = f"gapbench{time.monotonic_ns() % 10**9}"
        cfg = write_config(tmp / f"{project}.toml", broker.port, keepalive=30)
        cid = f"{project}-{bench.os.uname().nodename.split('.')[0]}"
        bench.precreate_session(broker.port, cid, "bulk/+/telemetry", v5=True)
        queue(broker.port, n, arm)
        assert broker.proc is not None
        broker_cpu = bench.cpu_seconds(broker.proc.pid)
        proc = bench.start_mqttd(project, cfg, db, tmp)
        try:
            t_first, t_last = bench.Observer(db, "bulk", n, "sensors_reading", proc).run(900)
            # CPU of the daemon, start-up included (the same in every arm: the difference is the stamps')
            cpu = bench.cpu_seconds(proc.pid)
            broker_cpu = bench.cpu_seconds(broker.proc.pid) - broker_cpu
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        ok = db.scalar("select count(distinct seq) from sensors_reading where source = 'bulk'") == n
        ranges = db.scalar("select count(*) from mqttd_publisherrange")
        return {"rate": n / (t_last - t_first), "cpu": cpu, "broker_cpu": broker_cpu,
                "ok": ok and ranges == (1 if arm == "stamped" else 0), "ranges": ranges}
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
                got: dict[str, dict[str, list[float]]] = {arm: {"rate": [], "cpu": [], "broker_cpu": []} for arm in ARMS}
                for r in range(args.rounds):
                    for arm in ARMS[r % 3:] + ARMS[:r % 3]:
                        row = one_run(broker, kind, args.n, arm, tmp)
                        ok &= row["ok"]
                        for key in got[arm]:
                            got[arm][key].append(row[key])
                        print(f"  {kind} round {r + 1} {arm}: {row['rate']:,.0f} msg/s, daemon CPU {row['cpu']:.2f} s, "
                              f"broker CPU {row['broker_cpu']:.2f} s (ranges stored: {row['ranges']}, ok: {row['ok']})",
                              flush=True)
                med = {arm: {k: statistics.median(v) for k, v in got[arm].items()} for arm in ARMS}
                base = med["unstamped"]
                print(f"batch route / {kind}, N = {args.n:,}, median of {args.rounds}:", flush=True)
                for arm in ARMS:
                    m = med[arm]
                    print(f"  {arm:9} {m['rate']:9,.0f} msg/s ({100 * (m['rate'] - base['rate']) / base['rate']:+5.1f}%)"
                          f"  daemon {1e6 * m['cpu'] / args.n:5.1f} us/msg ({1e6 * (m['cpu'] - base['cpu']) / args.n:+5.1f})"
                          f"  broker {1e6 * m['broker_cpu'] / args.n:5.1f} us/msg "
                          f"({1e6 * (m['broker_cpu'] - base['broker_cpu']) / args.n:+5.1f})", flush=True)
        finally:
            broker.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
