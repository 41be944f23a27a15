"""Supervisor deployment, end to end: `mqttd deploy` output run by a real supervisord, with a
real mosquitto and the sample tenant on SQLite (docs/deployment.md)."""
from __future__ import annotations

import json
import os
import signal

from lab.publish import Publisher, telemetry
from lab.supervisor import retained, wait_status, wait_until

from mqttd.daemon import lock
from mqttd.identity import short_hostname

HOST = short_hostname()


def _running_and_connected(site, sv, name: str, process: str | None = None, instance: int | None = None) -> dict:
    """RUNNING under Supervisor, holding its own lock, connected with its own client id."""
    info = sv.wait_state(process or f"{name}-mqtt", "RUNNING")
    ident = site.identity(name, instance)
    assert lock.is_held(ident.lock_path), f"{ident.lock_path} not held"
    assert lock.read_pid(ident.lock_path) == info["pid"]
    wait_status(ident.status_path, lambda s: s["pid"] == info["pid"] and s["connected"]
                and s["client_id"] == ident.client_id, what=f"{ident.name} connected")
    return info


def test_three_projects_run_side_by_side_and_bnp_is_restarted_with_supervisorctl(site, supervisord):
    # Given three Django projects on one host, listed in one inventory
    site.inventory(site.project("youtility4"), site.project("django5"), site.project("bnp"))
    # when the operator deploys and supervisord starts
    r = site.deploy()
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in site.conf_dir.iterdir()) == ["bnp-mqtt.conf", "django5-mqtt.conf",
                                                                "youtility4-mqtt.conf"]
    sv = supervisord.start()
    # then each runs under its own name, lock and client id
    first = {name: _running_and_connected(site, sv, name) for name in ("youtility4", "django5", "bnp")}
    assert len({i["pid"] for i in first.values()}) == 3

    # When the operator restarts bnp by hand with the real supervisorctl
    r = sv.ctl("stop", "bnp-mqtt")
    assert "bnp-mqtt: stopped" in r.stdout, r.stdout + r.stderr
    assert not lock.is_held(site.identity("bnp").lock_path)
    r = sv.ctl("start", "bnp-mqtt")
    assert r.returncode == 0 and "bnp-mqtt: started" in r.stdout, r.stdout + r.stderr
    # then it is RUNNING again, with a new pid holding its lock, connected as bnp-<host>
    info = _running_and_connected(site, sv, "bnp")
    assert info["pid"] != first["bnp"]["pid"]
    assert f"as bnp-{HOST}" in site.broker.log()
    # and the other projects were not touched
    assert sv.info("youtility4-mqtt")["pid"] == first["youtility4"]["pid"]
    assert sv.info("django5-mqtt")["pid"] == first["django5"]["pid"]
    # and `mqttd status --inventory` lists all three, connected
    r = site.host.mqttd("status", "--inventory", str(site.inventory_path), "--json")
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"youtility4", "django5", "bnp"}
    assert all(row["connected"] and row["state"] == "running" for row in rows.values()), rows


def test_a_child_killed_with_sigkill_is_restarted_and_takes_its_lock_again(site, supervisord):
    site.inventory(site.project("bnp"))
    assert site.deploy().returncode == 0
    sv = supervisord.start()
    old = _running_and_connected(site, sv, "bnp")

    os.kill(old["pid"], signal.SIGKILL)

    # Never BACKOFF: the kernel dropped the dead holder's flock, so the new process takes it at once.
    new = sv.wait_state("bnp-mqtt", "RUNNING", pid_not=old["pid"], never=("FATAL", "BACKOFF"))
    ident = site.identity("bnp")
    assert lock.read_pid(ident.lock_path) == new["pid"]
    assert lock.is_held(ident.lock_path)
    _running_and_connected(site, sv, "bnp")


def test_supervisorctl_stop_is_a_clean_exit_and_publishes_offline(site, supervisord):
    site.inventory(site.project("bnp"))
    assert site.deploy().returncode == 0
    sv = supervisord.start()
    _running_and_connected(site, sv, "bnp")
    assert retained(site.broker.port, "mqttd/bnp/status") == "online"

    r = sv.ctl("stop", "bnp-mqtt")

    assert "bnp-mqtt: stopped" in r.stdout, r.stdout + r.stderr
    info = sv.info("bnp-mqtt")
    assert info["statename"] == "STOPPED" and info["exitstatus"] == 0, info
    assert "stopped: bnp-mqtt (exit status 0)" in sv.log()        # not "terminated by SIGKILL"
    assert retained(site.broker.port, "mqttd/bnp/status") == "offline"
    assert not lock.is_held(site.identity("bnp").lock_path)


def test_broker_down_at_start_stays_running_and_consumes_when_it_returns(site, supervisord):
    site.broker.stop()
    site.inventory(site.project("bnp"))
    assert site.deploy().returncode == 0
    sv = supervisord.start()

    # RUNNING (past startsecs) while the broker is down, retrying inside the process
    info = sv.wait_state("bnp-mqtt", "RUNNING", never=("FATAL", "BACKOFF", "EXITED"))
    ident = site.identity("bnp")
    wait_status(ident.status_path, lambda s: s["pid"] == info["pid"] and not s["connected"] and s["reconnects"] >= 0)
    sv.hold_state("bnp-mqtt", "RUNNING", 2.0)

    site.broker.start()
    wait_status(ident.status_path, lambda s: s["connected"], what="connected after the broker came back")
    pub = Publisher(site.broker.port)
    try:
        pub.send("ble/dev-1/telemetry", {"seq": 1, "rssi": -50, "temp": 20})
        pub.wait_acked(1)
    finally:
        pub.close()
    wait_until(lambda: site.db.scalar("select count(*) from sensors_reading") == 1, what="the reading stored")
    assert sv.info("bnp-mqtt")["pid"] == info["pid"]     # the same process all along


def test_numprocs_two_share_the_load_and_store_every_message_once(site, supervisord):
    project = site.project("bnp", numprocs=2)
    # One canary round trip at start, then none: `handled` then counts only our messages.
    config = site.root / "bnp.toml"
    config.write_text(config.read_text().replace("canary_interval = 1", "canary_interval = 3600"))
    site.inventory(project)
    assert site.deploy().returncode == 0
    sv = supervisord.start()

    idents = [site.identity("bnp", i) for i in (0, 1)]
    infos = [_running_and_connected(site, sv, "bnp", f"bnp-mqtt:bnp-mqtt-{i}", i) for i in (0, 1)]
    assert len({i["pid"] for i in infos}) == 2
    assert {x.client_id for x in idents} == {f"bnp-0-{HOST}", f"bnp-1-{HOST}"}
    assert len({x.lock_path for x in idents}) == 2
    base = [wait_status(x.status_path, lambda s: s.get("canary_at") and "$share/bnp/ble/+/telemetry"
                        in s["subscriptions"], what="subscribed and canary done") for x in idents]

    pub = Publisher(site.broker.port)
    try:
        for seq in range(200):
            pub.send(f"ble/dev-{seq % 7}/telemetry", telemetry(seq))
        pub.wait_acked(200)
    finally:
        pub.close()

    wait_until(lambda: site.db.scalar("select count(*) from sensors_reading") >= 200, timeout=30, what="200 rows")
    handled = wait_until(lambda: _handled_since(idents, base, 200), timeout=10, what="status counts 200")
    assert site.db.scalar("select count(*) from sensors_reading") == 200
    assert site.db.scalar("select count(distinct seq) from sensors_reading") == 200
    assert all(n > 0 for n in handled), f"one instance took everything: {handled}"


def _handled_since(idents, base, total: int) -> list[int] | None:
    now = [json.loads(x.status_path.read_text())["handled"] for x in idents]
    deltas = [n - b["handled"] for n, b in zip(now, base)]
    return deltas if sum(deltas) == total else None


def test_apply_adds_changes_and_removes_programs_through_supervisord(site, supervisord):
    sv = supervisord.start()          # a running supervisord, nothing of ours in it yet
    youtility4, django5 = site.project("youtility4"), site.project("django5")
    site.inventory(youtility4, django5)

    r = site.deploy("--apply", "--supervisor-url", sv.url)

    assert r.returncode == 0, r.stderr
    assert "supervisord: added youtility4-mqtt" in r.stdout
    assert "supervisord: added django5-mqtt" in r.stdout
    old_django5 = sv.wait_state("django5-mqtt", "RUNNING")
    sv.wait_state("youtility4-mqtt", "RUNNING")

    # youtility4 leaves, django5 changes, bnp arrives
    site.inventory({**django5, "environment": {"DJANGO_DEBUG": "0"}}, site.project("bnp"))
    r = site.deploy("--apply", "--supervisor-url", sv.url)

    assert r.returncode == 0, r.stderr
    assert "supervisord: removed youtility4-mqtt" in r.stdout
    assert "supervisord: updated django5-mqtt" in r.stdout
    assert "supervisord: added bnp-mqtt" in r.stdout
    assert {i["group"] for i in sv.all_info()} == {"django5-mqtt", "bnp-mqtt"}
    assert not (site.conf_dir / "youtility4-mqtt.conf").exists()
    assert not lock.is_held(site.identity("youtility4").lock_path)
    new_django5 = sv.wait_state("django5-mqtt", "RUNNING", pid_not=old_django5["pid"])
    env = open(f"/proc/{new_django5['pid']}/environ", "rb").read().split(b"\0")
    assert b"DJANGO_DEBUG=0" in env and b"MQTTD_PROJECT=django5" in env
    sv.wait_state("bnp-mqtt", "RUNNING")

    r = site.deploy("--apply", "--supervisor-url", sv.url)
    assert r.returncode == 0 and "supervisord: already up to date" in r.stdout, r.stdout + r.stderr
