#!/usr/bin/env python3
"""QoS 1 publish throughput: mqttd's per-process publisher against a client per call.

Starts a private mosquitto on a free port (tests/support/broker.py), then measures:
- one process, several threads, one shared ``mqttd.Publisher``;
- a prefork-style pool: the parent publishes once, then forks 4 processes that each publish N/4
  through the module-level ``mqttd.publish`` (what a Celery prefork worker does);
- the anti-pattern: a new paho client per message (connect, publish, wait, disconnect).
Connections opened are counted from the broker's log; deliveries by a subscriber.

    .venv/bin/python scripts/bench_publish.py [--n 10000] [--per-call 500] [--threads 8] [--procs 4]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from support.broker import Broker  # noqa: E402

_CONNECTED = re.compile(r"New client connected from \S+ as \S+ \(")


class Counter:
    """A subscriber counting what arrives under ``bench/#``, per phase topic."""

    def __init__(self, port: int) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-counter", protocol=paho.MQTTv311)
        self.client.on_connect = lambda c, *a: c.subscribe("bench/#", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()
        if not ready.wait(10):
            raise SystemExit("bench: the counting subscriber could not subscribe")

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self._lock:
            self.counts[msg.topic] = self.counts.get(msg.topic, 0) + 1

    def wait(self, topic: str, n: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.counts.get(topic, 0) < n:
            time.sleep(0.02)
        time.sleep(0.2)
        return self.counts.get(topic, 0)


def with_threads(fn: Callable[[int, int], None], n: int, threads: int) -> None:
    share = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    ts = [threading.Thread(target=fn, args=(i, share[i])) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def bench_publisher(port: int, n: int, threads: int) -> None:
    import mqttd
    from mqttd.config import BrokerConfig

    pub = mqttd.Publisher(BrokerConfig(host="127.0.0.1", port=port), project="bench")
    topic = "bench/publisher"

    def work(t: int, count: int) -> None:
        for i in range(count):
            pub.publish(topic, f"{t}:{i}", qos=1)

    with_threads(work, n, threads)
    pub.close()


def _child(count: int, topic: str) -> None:
    import mqttd

    for i in range(count):
        mqttd.publish(topic, f"{os.getpid()}:{i}", qos=1)
    os._exit(0)          # as a pool process exits: no atexit, the kernel closes the socket


def bench_prefork(n: int, procs: int) -> int:
    """Returns how many messages the parent published before forking (1)."""
    import mqttd

    topic = "bench/prefork"
    mqttd.publish(topic, "parent", qos=1)          # the parent's connection is inherited by every child
    ctx = multiprocessing.get_context("fork")
    share = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    ps = [ctx.Process(target=_child, args=(share[i], topic)) for i in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"bench: a forked publisher exited {p.exitcode}")
    return 1


def bench_per_call(port: int, n: int) -> None:
    topic = "bench/per-call"
    for i in range(n):
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-percall-{i}", protocol=paho.MQTTv311)
        c.connect("127.0.0.1", port, 60)
        c.loop_start()
        info = c.publish(topic, str(i), qos=1)
        info.wait_for_publish(10)
        if not info.is_published():
            raise SystemExit(f"bench: per-call publish {i} was not acknowledged")
        c.disconnect()
        c.loop_stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--per-call", type=int, default=500)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--procs", type=int, default=4)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
        broker = Broker(Path(tmp) / "broker", persistence=False)
        broker.write_conf()
        if os.geteuid() == 0 and "user root" not in broker.conf_path.read_text():
            broker.extra += "\nuser root"      # else mosquitto drops to a user who cannot write the log
        broker.start()
        toml = Path(tmp) / "bench.toml"
        toml.write_text(f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\nprotocol = "5"\n')
        os.environ.update(MQTTD_CONFIG=str(toml), MQTTD_PROJECT="bench")
        counter = Counter(broker.port)
        rows = []
        try:
            phases = [
                (f"mqttd.Publisher, 1 process x {args.threads} threads", "bench/publisher", args.n,
                 lambda: bench_publisher(broker.port, args.n, args.threads)),
                (f"mqttd.publish, prefork {args.procs} processes", "bench/prefork", args.n,
                 lambda: bench_prefork(args.n, args.procs)),
                ("paho client per call", "bench/per-call", args.per_call,
                 lambda: bench_per_call(broker.port, args.per_call)),
            ]
            for label, topic, n, run in phases:
                before = len(_CONNECTED.findall(broker.log()))
                started = time.perf_counter()
                extra = run() or 0
                elapsed = time.perf_counter() - started
                delivered = counter.wait(topic, n + extra) - extra
                time.sleep(0.3)               # let mosquitto write its log
                opened = len(_CONNECTED.findall(broker.log())) - before
                rows.append((label, n, n / elapsed, opened, delivered))
        finally:
            import mqttd.publisher

            mqttd.publisher.default_publisher().close()
            counter.client.disconnect()
            counter.client.loop_stop()
            broker.stop()

    print(f"QoS 1 publish, mosquitto on 127.0.0.1:{broker.port} (loopback), {os.cpu_count()} CPUs")
    head = ("publisher", "messages", "messages/s", "connections opened", "delivered")
    print(f"| {head[0]:<40} | {head[1]:>8} | {head[2]:>10} | {head[3]:>18} | {head[4]:>9} |")
    print(f"|{'-' * 42}|{'-' * 9}:|{'-' * 11}:|{'-' * 19}:|{'-' * 10}:|")
    for label, n, rate, opened, delivered in rows:
        print(f"| {label:<40} | {n:>8} | {rate:>10,.0f} | {opened:>18} | {delivered:>9} |")


if __name__ == "__main__":
    main()
