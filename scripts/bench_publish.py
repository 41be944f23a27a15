#!/usr/bin/env python3
"""QoS 1 publish throughput: mqttd's per-process publisher against a client per call.

Starts a private mosquitto on a free port (scripts/lab/broker.py), then measures:
- one process, several threads, one shared ``mqttd.Publisher``, each ``publish()`` waiting for its
  PUBACK (the baseline of the ratios);
- one thread, one ``Publisher.publish_many`` of all N: pipelined up to the in-flight window, every
  message confirmed (over MQTT 3.1.1, and over MQTT 5 with the gap-detection stamp);
- one thread, N ``publish(wait=False)`` then a wait on every handle;
- a prefork-style pool: the parent publishes once, then forks 4 processes that each publish N/4
  through the module-level ``mqttd.publish`` (what a Celery prefork worker does);
- the anti-pattern: a new paho client per message (connect, publish, wait, disconnect).
Connections opened (first round) are counted from the broker's log; deliveries by a mosquitto_sub.
CPU per message (median of the rounds): of this process and its forked children ("client"), and of
the broker (from /proc: Linux only), which also forwards every message to the mosquitto_sub.

    .venv/bin/python scripts/bench_publish.py [--n 10000] [--per-call 500] [--threads 8] [--procs 4] [--rounds 3]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from lab.broker import Broker  # noqa: E402

_CONNECTED = re.compile(r"New client connected from \S+ as \S+ \(")


class Counter:
    """What arrives under ``bench/#``, per phase topic, counted by a ``mosquitto_sub`` process: a
    paho subscriber in this process would take the GIL from the publisher being measured (it
    halved the pipelined rows)."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.path = workdir / "received.txt"
        self._out = open(self.path, "wb")      # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", "bench/#",
                                      "-q", "1", "-i", "bench-counter", "-F", "%t"], stdout=self._out)
        deadline = time.monotonic() + 10
        while "bench-counter" not in _broker_log(workdir) and time.monotonic() < deadline:
            time.sleep(0.05)

    def count(self, topic: str) -> int:
        return sum(1 for line in self.path.read_bytes().splitlines() if line == topic.encode())

    def wait(self, topic: str, n: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.count(topic) < n:
            time.sleep(0.1)
        time.sleep(0.2)
        return self.count(topic)

    def close(self) -> None:
        self.proc.terminate()        # the mosquitto_sub we started, by its PID
        self.proc.wait(10)
        self._out.close()


def _broker_log(workdir: Path) -> str:
    log = workdir / "broker" / "mosquitto.log"
    return log.read_text() if log.exists() else ""


def cpu_seconds() -> float:
    """User + system CPU of this process and of its children that were waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def broker_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def bench_many(port: int, n: int, protocol: str) -> None:
    import mqttd
    from mqttd.config import BrokerConfig

    pub = mqttd.Publisher(BrokerConfig(host="127.0.0.1", port=port, protocol=protocol), project="bench")
    confirms = pub.publish_many((f"bench/many-{protocol}", f"{i}") for i in range(n))
    if not all(c.confirmed for c in confirms):
        raise SystemExit("bench: publish_many returned with unconfirmed messages")
    pub.close()


def bench_nowait(port: int, n: int) -> None:
    import mqttd
    from mqttd.config import BrokerConfig

    pub = mqttd.Publisher(BrokerConfig(host="127.0.0.1", port=port), project="bench")
    handles = [pub.publish("bench/nowait", f"{i}", wait=False) for i in range(n)]
    for h in handles:
        h.wait(30)
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
    ap.add_argument("--rounds", type=int, default=3)
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
        counter = Counter(broker.port, Path(tmp))
        rows = []
        try:
            phases = [
                (f"mqttd.Publisher, 1 process x {args.threads} threads", "bench/publisher", args.n,
                 lambda: bench_publisher(broker.port, args.n, args.threads)),
                ("publish_many, 1 thread (MQTT 3.1.1)", "bench/many-3.1.1", args.n,
                 lambda: bench_many(broker.port, args.n, "3.1.1")),
                ("publish_many, 1 thread (MQTT 5, stamped)", "bench/many-5", args.n,
                 lambda: bench_many(broker.port, args.n, "5")),
                ("publish(wait=False), 1 thread", "bench/nowait", args.n,
                 lambda: bench_nowait(broker.port, args.n)),
                (f"mqttd.publish, prefork {args.procs} processes", "bench/prefork", args.n,
                 lambda: bench_prefork(args.n, args.procs)),
                ("paho client per call", "bench/per-call", args.per_call,
                 lambda: bench_per_call(broker.port, args.per_call)),
            ]
            # Rounds, each phase once per round in turn: on a shared machine the load moves within
            # seconds, so a ratio is taken within a round and the median of the rounds reported.
            stats: dict[str, dict] = {label: {"rates": [], "ratios": [], "opened": None, "sent": 0, "extra": 0,
                                              "cpu": [], "broker_cpu": []} for label, *_ in phases}
            for _ in range(args.rounds):
                base = None
                for label, topic, n, run in phases:
                    before = len(_CONNECTED.findall(broker.log()))
                    assert broker.proc is not None
                    cpu, bcpu, started = cpu_seconds(), broker_cpu_seconds(broker.proc.pid), time.perf_counter()
                    stats[label]["extra"] += run() or 0
                    rate = n / (time.perf_counter() - started)
                    stats[label]["cpu"].append((cpu_seconds() - cpu) / n * 1e6)
                    counter.wait(topic, stats[label]["sent"] + n + stats[label]["extra"], timeout=10)
                    stats[label]["broker_cpu"].append((broker_cpu_seconds(broker.proc.pid) - bcpu) / n * 1e6)
                    base = base or rate
                    st = stats[label]
                    st["rates"].append(rate)
                    st["ratios"].append(rate / base)
                    st["sent"] += n
                    if st["opened"] is None:
                        time.sleep(0.3)               # let mosquitto write its log
                        st["opened"] = len(_CONNECTED.findall(broker.log())) - before
            for label, topic, n, _run in phases:
                st = stats[label]
                delivered = counter.wait(topic, st["sent"] + st["extra"]) - st["extra"]
                rows.append((label, n, statistics.median(st["rates"]), statistics.median(st["ratios"]), st["opened"],
                             f"{delivered}/{st['sent']}", statistics.median(st["cpu"]),
                             statistics.median(st["broker_cpu"])))
        finally:
            import mqttd.publisher

            mqttd.publisher.default_publisher().close()
            counter.close()
            broker.stop()

    print(f"QoS 1 publish, mosquitto on 127.0.0.1:{broker.port} (loopback), {os.cpu_count()} CPUs, "
          f"median of {args.rounds} rounds")
    head = ("publisher", "messages", "messages/s", "x threads", "connections opened", "delivered",
            "client CPU µs/msg", "broker CPU µs/msg")
    print(f"| {head[0]:<40} | {head[1]:>8} | {head[2]:>10} | {head[3]:>9} | {head[4]:>18} | {head[5]:>11} "
          f"| {head[6]:>17} | {head[7]:>17} |")
    print(f"|{'-' * 42}|{'-' * 9}:|{'-' * 11}:|{'-' * 10}:|{'-' * 19}:|{'-' * 12}:|{'-' * 18}:|{'-' * 18}:|")
    # "x threads": the rate over that of publish() from N threads in the same round (median)
    for label, n, rate, ratio, opened, delivered, cpu, bcpu in rows:
        print(f"| {label:<40} | {n:>8} | {rate:>10,.0f} | {ratio:>9.1f} | {opened:>18} | {delivered:>11} "
              f"| {cpu:>17.0f} | {bcpu:>17.0f} |")

if __name__ == "__main__":
    main()
