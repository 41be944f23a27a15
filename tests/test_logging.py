"""The per-project log: identity on every line, logrotate-friendly, and the tenant's LOGGING respected."""
import os
import signal

from lab.daemon import write_config
from lab.publish import Publisher, telemetry
from lab.waits import wait_rows, wait_until


def test_every_line_names_project_pid_and_client_id_and_a_moved_log_is_reopened(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db,
                   env={"TENANT_LOGGING": "1"})        # the tenant's LOGGING disables existing loggers
    st = d.wait_connected()
    lines = [ln for ln in d.log().splitlines() if ln.strip()]
    assert lines and all(f"mqttd[bnp] pid={d.pid} client={st['client_id']}:" in ln for ln in lines)
    assert any("connected to 127.0.0.1" in ln for ln in lines)

    rotated = d.log_path.with_suffix(".log.1")
    os.rename(d.log_path, rotated)                      # what logrotate does
    pub = Publisher(broker.port)
    pub.send("ble/dev-1/telemetry", b"{bad json")       # a warning line after the move
    pub.wait_acked(1)
    wait_until(lambda: d.log_path.exists() and "not valid JSON" in d.log_path.read_text(), 20, "new log file")

    d.signal(signal.SIGHUP)
    wait_until(lambda: "log file reopened (SIGHUP)" in d.log(), 20, "SIGHUP reopen")
    pub.send("ble/dev-1/telemetry", telemetry(1))
    pub.wait_acked(2)
    pub.close()
    wait_rows(sqlite_db, 1)
    assert "not valid JSON" not in rotated.read_text()
    assert d.stop() == 0
    assert "stopped cleanly" in d.log()


def test_a_log_dir_that_cannot_be_created_does_not_stop_the_daemon(host, broker, sqlite_db, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")                              # LOG_ROOT is a file: mkdir fails
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db,
                   env={"MQTTD_LOG_DIR": str(blocker)})
    d.wait_connected()
    pub = Publisher(broker.port)
    pub.send("ble/dev-1/telemetry", telemetry(1))
    pub.wait_acked(1)
    pub.close()
    wait_rows(sqlite_db, 1)
    assert d.stop() == 0
    assert "cannot log to" in d.proc.stderr.read()


def test_a_full_log_disk_does_not_stop_the_daemon_or_flood_stderr(host, broker, sqlite_db, tmp_path):
    # Given a log file on a device that is always full (every write fails with ENOSPC)
    (host.log_dir / "bnp").mkdir(parents=True)
    (host.log_dir / "bnp" / "mqttd.log").symlink_to("/dev/full")
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db)
    d.wait_connected()
    # when messages arrive, including one that logs a warning
    pub = Publisher(broker.port)
    pub.send("ble/dev-1/telemetry", b"{bad json")
    for seq in range(1, 21):
        pub.send("ble/dev-1/telemetry", telemetry(seq))
    pub.wait_acked(21)
    pub.close()
    # then every message is stored, it stops cleanly, and stderr carries no traceback per line
    wait_rows(sqlite_db, 20)
    assert d.stop() == 0
    err = d.proc.stderr.read()
    assert "Traceback" not in err and "Logging error" not in err, err[-2000:]
