"""``/metrics`` (Prometheus, via prometheus-client) and ``/healthz`` on 127.0.0.1 by default.

The collector reads the daemon's status snapshot at scrape time, so metrics cost nothing on the
message path. ``/healthz`` answers 200 or 503 with the same verdict as ``mqttd health``.

The output passes ``promtool check metrics``. Every series carries ``project`` and, for a
``numprocs`` instance, ``mqttd_instance`` (its number): never ``instance`` or ``job``, which
Prometheus attaches itself (a scrape would rename ours to ``exported_instance``). Latencies are
histograms (``mqttd_ack_latency_seconds``), so quantiles aggregate across instances with
``histogram_quantile``.
"""
from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mqttd.daemon.schema import Status
from mqttd.daemon.status import verdict

log = logging.getLogger("mqttd.metrics")

# The daemon's status now (``mqttd.daemon.schema.snapshot``); a plain dict is read as its JSON form.
Snapshot = Callable[[], "Status | dict[str, Any]"]

# Receipt -> PUBACK written. A healthy batch acks in milliseconds; a database outage holds acks
# for as long as it lasts, hence the long tail.
ACK_LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                          60.0, 300.0)
LABELS = ["project", "mqttd_instance"]


class LatencyWindow(deque[float]):
    """The last ``maxlen`` latencies in seconds (for the status file's p50/p99), plus a cumulative
    histogram of every latency since the process started (for ``/metrics``).

    Written by one thread (``append``), read by others (``histogram``): the lock keeps the
    buckets, the sum and the count of one reading consistent with each other.
    """

    def __init__(self, iterable: Iterable[float] = (), maxlen: int | None = 1000,
                 buckets: Iterable[float] = ACK_LATENCY_BUCKETS) -> None:
        super().__init__((), maxlen)
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)     # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        for value in iterable:
            self.append(value)

    def append(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))              # a wall-clock step back must not go negative
        with self._lock:
            super().append(seconds)
            self._counts[bisect_left(self.bounds, seconds)] += 1
            self._sum += seconds

    def histogram(self) -> dict[str, Any]:
        """``{"buckets": [[upper bound, cumulative count], ..., ["+Inf", count]], "sum": s, "count": n}``
        (JSON-ready: the daemon puts it in its snapshot and status file)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets: list[list[Any]] = []
        running = 0
        for bound, n in zip((*self.bounds, "+Inf"), counts):
            running += n
            buckets.append([bound, running])
        return {"buckets": buckets, "sum": total, "count": running}

# (metric name, snapshot key, help) -- counters. The five outcomes, ``received`` and the
# ``mqttd_in_flight`` gauge add up (mqttd.ingest.stats): received = handled + dead letters +
# duplicates + unrouted + canary + in flight, in every scrape.
_COUNTERS = [
    ("mqttd_messages_received", "received", "Messages delivered by the broker (canaries included)."),
    ("mqttd_messages_handled", "handled", "Tenant messages whose handlers ran and committed."),
    ("mqttd_messages_acked", "acked", "PUBACKs handed to the broker after commit."),
    ("mqttd_dead_letters", "dead_letters", "Messages stored as dead letters."),
    ("mqttd_duplicates_skipped", "duplicates_skipped", "Redeliveries skipped by a dedupe key."),
    ("mqttd_messages_unrouted", "unrouted", "Messages that matched no route (acked)."),
    ("mqttd_canary_messages", "canary", "Canary messages received back through the pipeline."),
    ("mqttd_batches", "batches", "Committed batches."),
    ("mqttd_reconnects", "reconnects", "Broker reconnects."),
    ("mqttd_session_gaps", "session_gaps", "Connects where the broker had lost the persistent session."),
    ("mqttd_db_retries", "db_retries", "Batch attempts that failed because the database was unavailable."),
]


# Counters the snapshot may not carry (a feature that is off): exported when present.
_OPTIONAL_COUNTERS = [
    ("mqttd_publisher_gaps", "publisher_gaps", "Published sequence numbers still missing after the settle window."),
]


class DaemonCollector:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot()
        st = snap if isinstance(snap, Status) else Status.from_json(snap)
        labels = LABELS
        values = [st.project, "" if st.instance is None else str(st.instance)]
        for name, key, doc in _COUNTERS + [c for c in _OPTIONAL_COUNTERS if st.get(c[1]) is not None]:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, float(st.get(key) or 0))
            yield c
        now = time.time()

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            if value is not None:
                g.add_metric(values, float(value))
            return g

        yield gauge("mqttd_connected", "1 while connected to the broker.", 1 if st.connected else 0)
        yield gauge("mqttd_db_ok", "1 if the last database round trip succeeded.", 1 if st.db_ok is not False else 0)
        yield gauge("mqttd_backlog", "Messages received and not yet committed.", st.backlog)
        yield gauge("mqttd_in_flight", "Messages received and not yet settled in an outcome (intake, batch in "
                    "hand, committed and not yet acked).", st.in_flight)
        yield gauge("mqttd_rate_1m", "Tenant messages per second over the last minute.", st.rate_1m)
        last = st.last_message_at
        yield gauge("mqttd_last_message_age_seconds", "Seconds since the last tenant message.",
                    now - last if last else None)
        canary = st.canary_at
        yield gauge("mqttd_canary_age_seconds", "Seconds since the last end-to-end canary round trip.",
                    now - canary if canary else now - float(st.started_at or now))
        rtt = st.canary_rtt_ms
        yield gauge("mqttd_canary_rtt_seconds", "Duration of the last canary round trip.", rtt / 1000 if rtt else None)
        yield gauge("mqttd_up_seconds", "Seconds since the process started.", now - float(st.started_at or now))
        yield gauge("mqttd_start_time_seconds", "Start time of the process, seconds since the epoch.", st.started_at)
        yield gauge("mqttd_healthy", "1 if healthy (lock, broker, database, canary: what mqttd health checks).",
                    1 if verdict(st, True, now).healthy else 0)
        lat = HistogramMetricFamily("mqttd_ack_latency_seconds", "Receipt of the oldest message of a batch -> "
                                    "its PUBACK written to the broker.", labels=labels)
        hist = st.ack_latency or LatencyWindow().histogram()
        lat.add_metric(values, [(_le(bound), float(n)) for bound, n in hist["buckets"]], float(hist["sum"]))
        yield lat


def _le(bound: Any) -> str:
    """prometheus-client's spelling of a bucket bound (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == "+Inf" else repr(float(bound))


class MetricsServer:
    def __init__(self, snapshot: Snapshot, host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(snapshot))
        self.registry.register(ProcessCollector(registry=None))     # process_cpu_seconds_total, memory, fds
        registry, snap = self.registry, snapshot

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif self.path.split("?")[0] == "/healthz":
                    v = verdict(snap(), True)
                    body, ctype, code = (v.reason + "\n").encode(), "text/plain; charset=utf-8", 200 if v.healthy else 503
                else:
                    body, ctype, code = b"not found: try /metrics or /healthz\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="mqttd-metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics (and /healthz)", self.server.server_address[0], self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
