"""``/metrics`` (Prometheus, via prometheus-client) and ``/healthz`` on 127.0.0.1 by default.

The collector reads the daemon's status snapshot at scrape time, so metrics cost nothing on the
message path. ``/healthz`` answers 200 or 503 with the same verdict as ``mqttd health``.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .status import verdict

log = logging.getLogger("mqttd.metrics")

Snapshot = Callable[[], dict[str, Any]]

# (metric name, snapshot key, help) -- counters
_COUNTERS = [
    ("mqttd_messages_received", "received", "Messages delivered by the broker (canaries included)."),
    ("mqttd_messages_handled", "handled", "Tenant messages whose batch committed."),
    ("mqttd_messages_acked", "acked", "PUBACKs handed to the broker after commit."),
    ("mqttd_dead_letters", "dead_letters", "Messages stored as dead letters."),
    ("mqttd_duplicates_skipped", "duplicates_skipped", "Redeliveries skipped by a dedupe key."),
    ("mqttd_messages_unrouted", "unrouted", "Messages that matched no route (acked)."),
    ("mqttd_batches", "batches", "Committed batches."),
    ("mqttd_reconnects", "reconnects", "Broker reconnects."),
    ("mqttd_session_gaps", "session_gaps", "Connects where the broker had lost the persistent session."),
    ("mqttd_db_retries", "db_retries", "Batch attempts that failed because the database was unavailable."),
]


class DaemonCollector:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        st = self.snapshot()
        labels = ["project", "instance"]
        values = [st.get("project") or "", "" if st.get("instance") is None else str(st["instance"])]
        for name, key, doc in _COUNTERS:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, float(st.get(key) or 0))
            yield c
        now = time.time()

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            if value is not None:
                g.add_metric(values, float(value))
            return g

        yield gauge("mqttd_connected", "1 while connected to the broker.", 1 if st.get("connected") else 0)
        yield gauge("mqttd_db_ok", "1 if the last database round trip succeeded.", 1 if st.get("db_ok") is not False else 0)
        yield gauge("mqttd_backlog", "Messages received and not yet committed.", st.get("backlog", 0))
        yield gauge("mqttd_rate_1m", "Tenant messages per second over the last minute.", st.get("rate_1m", 0))
        last = st.get("last_message_at")
        yield gauge("mqttd_last_message_age_seconds", "Seconds since the last tenant message.",
                    now - last if last else None)
        canary = st.get("canary_at")
        yield gauge("mqttd_canary_age_seconds", "Seconds since the last end-to-end canary round trip.",
                    now - canary if canary else now - float(st.get("started_at") or now))
        rtt = st.get("canary_rtt_ms")
        yield gauge("mqttd_canary_rtt_seconds", "Duration of the last canary round trip.", rtt / 1000 if rtt else None)
        yield gauge("mqttd_up_seconds", "Seconds since the process started.", now - float(st.get("started_at") or now))
        yield gauge("mqttd_healthy", "1 if healthy by the SPEC definition (see /healthz).",
                    1 if verdict(st, True, now).healthy else 0)
        lat = GaugeMetricFamily("mqttd_ack_latency_seconds", "Receipt -> PUBACK written, oldest message of "
                                "each of the last 1000 batches.", labels=labels + ["quantile"])
        for q in ("p50", "p99"):
            v = st.get(f"ack_latency_ms_{q}")
            if v is not None:
                lat.add_metric(values + ["0.5" if q == "p50" else "0.99"], v / 1000)
        yield lat


class MetricsServer:
    def __init__(self, snapshot: Snapshot, host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(snapshot))
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
