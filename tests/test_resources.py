"""Memory, file descriptors and threads stay bounded."""
import json
import os

from lab.daemon import write_config
from lab.publish import fill, telemetry
from lab.waits import wait_rows, wait_until


def _vm(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def test_a_flood_of_100k_queued_messages_keeps_rss_bounded(host, broker, sqlite_db, tmp_path):
    n = 100_000
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    assert d.stop() == 0
    fill(broker.port, n, lambda i: f"bulk/dev-{i % 50}/telemetry", lambda i: json.dumps(telemetry(i)))
    d = host.start("bnp", cfg, sqlite_db)
    wait_rows(sqlite_db, n, timeout=120, what="count(distinct seq)")
    peak_mb = _vm(d.pid, "VmHWM") / 1024
    print(f"peak RSS with {n} messages queued at start-up: {peak_mb:.0f} MB")
    assert peak_mb < 150
    st = d.wait_for(lambda s: s["backlog"] == 0, what="drained")
    assert st["dead_letters"] == 0
    assert d.stop() == 0


def test_fds_and_threads_stay_flat_across_reconnects(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db)
    d.wait_for(lambda s: s.get("canary_at"), what="first canary (the database is open)")
    fds0 = len(os.listdir(f"/proc/{d.pid}/fd"))
    threads0 = _vm(d.pid, "Threads")
    for i in range(5):
        broker.restart()
        d.wait_for(lambda s, i=i: s["connected"] and s["reconnects"] >= i + 1, what=f"reconnect {i + 1}")
    wait_until(lambda: len(os.listdir(f"/proc/{d.pid}/fd")) <= fds0, 10, "fds back to the start")
    assert _vm(d.pid, "Threads") == threads0
    assert d.stop() == 0


def test_the_collector_is_set_for_a_long_running_daemon_once_start_up_is_done():
    # mqttd.daemon.heap: start-up's objects frozen out of every collection, the young generation's
    # threshold raised (the defaults cost the batch route 10-12 us a message in full collections).
    import subprocess
    import sys

    code = ("import gc; from mqttd.daemon import heap; before = gc.get_threshold(); heap.settle(); "
            "print(gc.get_freeze_count() > 0, before[1:] == gc.get_threshold()[1:], gc.get_threshold()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "50000"]
