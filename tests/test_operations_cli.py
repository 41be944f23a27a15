"""check, replay and `python manage.py mqttd` as an operator uses them."""
import os
import signal
import subprocess
import sys

from lab.daemon import write_config
from lab.db import TENANT_DIR, TenantDB
from lab.publish import Publisher, telemetry
from lab.waits import wait_rows, wait_until


def test_check_prints_routes_and_grants_and_consumes_nothing(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ble/{device}/telemetry -> sensors.mqtt_handlers.save_reading" in r.stdout
    assert "subscribe ble/+/telemetry: granted QoS 1" in r.stdout
    assert "migrations applied" in r.stdout and "check passed" in r.stdout
    assert "as bnp-" in r.stdout and "-check with a clean session" in r.stdout


def test_check_fails_clearly_when_the_broker_is_down(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    broker.stop()
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), "--timeout", "3", db=sqlite_db)
    assert r.returncode == 1 and "check failed: broker: cannot connect" in r.stderr


def test_check_reports_unapplied_migrations(host, broker, tmp_path):
    fresh = TenantDB.sqlite(tmp_path / "unmigrated.sqlite3")
    r = host.mqttd("check", "--project", "bnp", "--config", str(write_config(tmp_path / "c.toml", broker.port)),
                   db=fresh)
    assert r.returncode == 1 and "migrations not applied" in r.stderr


def test_replay_runs_dead_letters_again_deleting_the_fixed_and_counting_the_failed(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    pub = Publisher(broker.port)
    pub.send("ble/dev-1/telemetry", telemetry(1, fail=True))
    pub.send("ble/dev-1/telemetry", b"{broken")
    pub.send("ble/dev-1/telemetry", telemetry(2))
    pub.wait_acked(3)
    pub.close()
    wait_rows(sqlite_db, 2, table="mqttd_deadletter")
    # The bug in the handler is fixed (TENANT_FIXED); the broken JSON stays broken.
    r = host.mqttd("replay", "--project", "bnp", "--config", str(cfg), db=sqlite_db, env={"TENANT_FIXED": "1"})
    assert r.returncode == 1, r.stdout + r.stderr           # one letter still fails
    assert "1 succeeded, 1 failed" in r.stdout
    assert sqlite_db.scalar("select count(*) from sensors_reading where seq = 1") == 1
    left = sqlite_db.query("select topic, attempts, error from mqttd_deadletter")
    assert len(left) == 1 and left[0][1] == 2 and "not valid JSON" in left[0][2]
    assert d.proc.poll() is None                             # safe while the daemon runs
    assert d.stop() == 0


def test_manage_py_mqttd_runs_the_same_daemon(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    env = host.env(**sqlite_db.env, DJANGO_SETTINGS_MODULE="tenant_site.settings")
    proc = subprocess.Popen([sys.executable, "manage.py", "mqttd", "--project", "bnp", "--config", str(cfg)],
                            cwd=TENANT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    host.procs.append(proc)
    status = host.run_dir / "bnp.status.json"
    wait_until(lambda: status.exists() and '"connected": true' in status.read_text(), 30, "connected")
    pub = Publisher(broker.port)
    pub.send("ble/dev-9/telemetry", telemetry(7))
    pub.wait_acked(1)
    pub.close()
    wait_rows(sqlite_db, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    second = subprocess.run([sys.executable, "manage.py", "mqttd", "--project", "BAD"], cwd=TENANT_DIR, env=env,
                            capture_output=True, text=True)
    assert second.returncode == 2 and "must match" in second.stderr


def test_the_shipped_migrations_match_the_models(tmp_path):
    # A tenant whose CI runs `makemigrations --check` must not be told that mqttd has model changes
    # without a migration (the package's migrations are the schema its code writes).
    db = TenantDB.sqlite(tmp_path / "any.sqlite3")
    r = subprocess.run([sys.executable, "manage.py", "makemigrations", "mqttd", "--check", "--dry-run"],
                       cwd=TENANT_DIR, env={**os.environ, **db.env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "No changes detected" in r.stdout, r.stdout + r.stderr
