"""The pure parts of health and recovery: the verdict's limits and their overrides, the restart
history behind the crash-loop brake, Supervisor process names, the event listener's protocol,
and the cron wrappers' own failures. No broker or supervisord needed."""
from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from mqttd.daemon import status
from mqttd.deploy.inventory import parse
from mqttd.ops import recover
from mqttd.ops.eventlistener import serve

NOW = 1_000_000.0
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _status(**over: object) -> dict:
    return {"state": "running", "updated_at": NOW - 1, "started_at": NOW - 600, "connected": True,
            "db_ok": True, "canary_at": NOW - 2, **over}


def test_the_verdict_keeps_specs_limits_unless_overridden(monkeypatch):
    monkeypatch.delenv("MQTTD_CANARY_MAX_AGE", raising=False)
    monkeypatch.delenv("MQTTD_STATUS_MAX_AGE", raising=False)
    assert status.verdict(_status(canary_at=NOW - 59), True, NOW).healthy
    v = status.verdict(_status(canary_at=NOW - 61), True, NOW)
    assert not v.healthy and v.reason == "last canary round trip 61s ago (subscriptions lost or pipeline stuck)"
    assert status.verdict(_status(updated_at=NOW - 14), True, NOW).healthy
    assert status.verdict(_status(updated_at=NOW - 16), True, NOW).reason.startswith("status file is stale (16s old)")
    assert status.verdict(_status(), False, NOW).reason == "not running (lock not held)"

    monkeypatch.setenv("MQTTD_CANARY_MAX_AGE", "5")
    monkeypatch.setenv("MQTTD_STATUS_MAX_AGE", "3")
    assert status.verdict(_status(canary_at=NOW - 6), True, NOW).reason.startswith("last canary round trip 6s ago")
    assert status.verdict(_status(updated_at=NOW - 4), True, NOW).reason.startswith("status file is stale")

    for junk in ("", "soon", "-5", "0", "nan"):       # a typo keeps the default limits
        monkeypatch.setenv("MQTTD_CANARY_MAX_AGE", junk)
        assert status.verdict(_status(canary_at=NOW - 59), True, NOW).healthy
        assert not status.verdict(_status(canary_at=NOW - 61), True, NOW).healthy


def test_the_restart_history_counts_an_hour_and_survives_a_garbled_file(tmp_path):
    path = tmp_path / "bnp.recover.json"
    h = recover.History(path).open()
    for t in (NOW - 4000, NOW - 3000, NOW - 10):      # the first is outside the window
        h.record(t)
    h.close()
    h = recover.History(path).open(write=False)
    assert h.recent(NOW) == [NOW - 3000, NOW - 10] and h.error is None
    path.write_text("{not json")
    assert recover.History(path).open(write=False).recent(NOW) == []


def test_the_restart_history_refuses_to_write_through_a_symlink(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    link = tmp_path / "bnp.recover.json"
    link.symlink_to(target)
    h = recover.History(link).open()
    assert h.error and h._fd is None
    h.close()
    assert target.read_text() == "keep me"


def test_supervisor_process_names_follow_the_generated_conf(tmp_path):
    inv = parse({"defaults": {"user": "u", "venv": "/v", "run_dir": str(tmp_path)},
                 "project": [{"name": "bnp", "numprocs": 2}, {"name": "django5"}]}, tmp_path / "i.toml")
    bnp, django5 = inv.projects
    assert [recover.process_name(bnp, i) for i in bnp.identities({})] == ["bnp-mqtt:bnp-mqtt-0", "bnp-mqtt:bnp-mqtt-1"]
    assert [recover.process_name(django5, i) for i in django5.identities({})] == ["django5-mqtt:django5-mqtt"]


def _event(name: str, payload: str) -> str:
    return (f"ver:3.0 server:supervisor serial:1 pool:mqttd-recover poolserial:1 eventname:{name} "
            f"len:{len(payload)}\n{payload}")


def test_the_event_listener_speaks_the_protocol_and_ignores_other_programs(tmp_path, capsys):
    stdin = io.StringIO(_event("PROCESS_STATE_FATAL", "processname:celery groupname:celery from_state:BACKOFF")
                        + _event("PROCESS_STATE_RUNNING", "processname:bnp-mqtt groupname:bnp-mqtt from_state:STARTING pid:1"))
    protocol = io.StringIO()

    assert serve(str(tmp_path / "no-inventory.toml"), None, stdin, protocol) == 0     # stdin closed: done

    assert protocol.getvalue() == "READY\nRESULT 2\nOKREADY\nRESULT 2\nOKREADY\n"
    assert capsys.readouterr().err == ""               # neither event concerns an mqttd program


def test_the_event_listener_reports_a_bad_inventory_and_carries_on(tmp_path, capsys):
    stdin = io.StringIO(_event("PROCESS_STATE_FATAL", "processname:bnp-mqtt groupname:bnp-mqtt from_state:BACKOFF"))
    protocol = io.StringIO()

    assert serve(str(tmp_path / "missing.toml"), None, stdin, protocol) == 0

    assert protocol.getvalue() == "READY\nRESULT 2\nOKREADY\n"
    err = capsys.readouterr().err
    assert "mqttd-recover: bnp: " in err and "missing.toml: inventory file not found" in err


@pytest.mark.parametrize("script", ["check_mqtt_health", "mqtt_recovery"])
def test_the_cron_wrappers_fail_in_one_line_without_mqttd(script):
    env = {**os.environ, "MQTTD_BIN": "/nonexistent/mqttd"}
    r = subprocess.run([str(SCRIPTS / script), "/etc/nowhere.toml"], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"{script}: mqttd not found (set MQTTD_BIN or PATH)\n"
