"""The Prometheus endpoint and /healthz of a running daemon."""
import time
import urllib.error
import urllib.request

from lab.daemon import write_config
from lab.publish import Publisher, telemetry
from lab.waits import wait_rows, wait_until

from mqttd.daemon.metrics import ACK_LATENCY_BUCKETS, LatencyWindow


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_scrape_and_healthz_flips_to_503_when_the_broker_stops(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db, "--metrics-port", "0")
    st = d.wait_for(lambda s: s.get("connected") and s.get("canary_at") and s.get("metrics_port"), what="canary")
    port = st["metrics_port"]
    pub = Publisher(broker.port)
    for i in range(20):
        pub.send(f"ble/dev-{i % 2}/telemetry", telemetry(i))
    pub.send("ble/dev-0/telemetry", b"not json")
    pub.wait_acked(21)
    pub.close()
    wait_rows(sqlite_db, 20)
    d.wait_for(lambda s: s["handled"] + s["dead_letters"] >= 21, what="settled")
    time.sleep(0.6)
    code, text = _get(port, "/metrics")
    assert code == 200
    for series in ("mqttd_messages_handled_total", "mqttd_connected", "mqttd_canary_age_seconds",
                   "mqttd_dead_letters_total", "mqttd_backlog", "mqttd_ack_latency_seconds_bucket", "mqttd_healthy"):
        assert f"\n{series}{{" in text, series
    assert 'mqttd_messages_handled_total{mqttd_instance="",project="bnp"} 20.0' in text
    assert 'mqttd_dead_letters_total{mqttd_instance="",project="bnp"} 1.0' in text
    assert 'mqttd_connected{mqttd_instance="",project="bnp"} 1.0' in text
    assert 'mqttd_ack_latency_seconds_bucket{le="+Inf",mqttd_instance="",project="bnp"}' in text
    assert "instance=" not in text.replace("mqttd_instance=", "")
    assert _get(port, "/healthz") == (200, "ok\n")

    broker.stop()
    code, reason = wait_until(lambda: (r := _get(port, "/healthz"))[0] == 503 and r, 60, "healthz 503")
    assert "broker disconnected" in reason
    assert 'mqttd_connected{mqttd_instance="",project="bnp"} 0.0' in _get(port, "/metrics")[1]
    broker.start()
    wait_until(lambda: _get(port, "/healthz")[0] == 200, 60, "healthy again")
    assert d.stop() == 0


def test_the_metrics_endpoint_binds_to_loopback_by_default(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db, "--metrics-port", "0")
    st = d.wait_for(lambda s: s.get("metrics_port"), what="metrics port")
    port = st["metrics_port"]
    listening = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
    local = [row[1] for row in listening if row[3] == "0A" and int(row[1].split(":")[1], 16) == port]
    assert local == [f"0100007F:{port:04X}"]          # 127.0.0.1 only
    assert d.stop() == 0


def test_the_latency_window_keeps_the_last_1000_and_a_cumulative_histogram_of_all():
    w = LatencyWindow(maxlen=1000)
    for i in range(3000):
        w.append(0.003 if i % 3 else 7.0)      # two thirds in the first bucket, one third in (5, 10]
    w.append(-0.5)                              # a wall clock stepped back counts as 0, not below

    assert len(w) == 1000 and w[-1] == 0.0      # the status file's p50/p99 window
    h = w.histogram()
    assert h["count"] == 3001
    assert abs(h["sum"] - 1000 * 7.0 - 2000 * 0.003) < 1e-6
    bounds = [b for b, _ in h["buckets"]]
    assert bounds == [*ACK_LATENCY_BUCKETS, "+Inf"]
    counts = dict((b, n) for b, n in h["buckets"])
    assert counts[0.005] == 2001 and counts[5.0] == 2001 and counts[10.0] == 3001 and counts["+Inf"] == 3001
    assert [n for _, n in h["buckets"]] == sorted(n for _, n in h["buckets"])   # cumulative
