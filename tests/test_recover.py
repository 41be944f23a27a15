"""Health and recovery as an operator meets them (docs/operations.md): `mqttd status`, `health`, `recover`,
the cron wrappers in scripts/ and the Supervisor event listener, against a real supervisord, a
real mosquitto and the sample tenant on SQLite.

Canary limit: health's 60 s would make each zombie test wait a minute, so the commands that judge
here run with MQTTD_CANARY_MAX_AGE=5 (the daemons publish a canary every second).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from lab.publish import Publisher
from lab.supervisor import VENV, wait_status, wait_until

from mqttd.daemon import lock
from mqttd.deploy import render as supervisor_conf
from mqttd.deploy.inventory import load_inventory

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
FAST = {"MQTTD_CANARY_MAX_AGE": "5"}


def _deploy(site, *projects: dict) -> None:
    site.inventory(*projects)
    r = site.deploy()
    assert r.returncode == 0, r.stdout + r.stderr


def _fail_fast(site, name: str) -> None:
    """Rewrite NAME-mqtt.conf as deployed but with startsecs=3, startretries=0: one failed start
    is FATAL (the deployed 20 retries take minutes to get there). 3 s, not 1: on a loaded machine
    a config error can take over a second to exit, and must still count as a failed start."""
    project = next(p for p in load_inventory(site.inventory_path).projects if p.name == name)
    text = supervisor_conf.render(project, site.inventory_path)
    text = text.replace(f"startsecs={supervisor_conf.START_SECS}\n", "startsecs=3\n")
    text = text.replace(f"startretries={supervisor_conf.START_RETRIES}\n", "startretries=0\n")
    (site.conf_dir / f"{project.program}.conf").write_text(text)


def _recover(site, sv, *args: str) -> subprocess.CompletedProcess:
    return site.host.mqttd("recover", "--inventory", str(site.inventory_path), "--supervisor-url", sv.url, *args,
                           env=FAST, timeout=80)


def _script(site, sv, name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = site.host.env(MQTTD_BIN=str(VENV / "bin" / "mqttd"), SUPERVISOR_SERVER_URL=sv.url, **FAST, **env)
    return subprocess.run([str(SCRIPTS / name), *args], env=e, capture_output=True, text=True, timeout=80)


def _health(site, name: str = "bnp") -> subprocess.CompletedProcess:
    return site.host.mqttd("health", "--project", name, env=FAST)


def _healthy_with_canary(site, sv, name: str = "bnp") -> dict:
    info = sv.wait_state(f"{name}-mqtt", "RUNNING")
    wait_status(site.identity(name).status_path, lambda s: s["pid"] == info["pid"] and s["connected"]
                and (s.get("canary_at") or 0) > s["started_at"], what=f"{name}: a canary round trip")
    return info


def _restarts(site, name: str = "bnp") -> list[float]:
    path = site.host.run_dir / f"{name}.recover.json"
    text = path.read_text() if path.exists() else ""
    return json.loads(text)["restarts"] if text else []


def _spawns(sv, name: str = "bnp-mqtt") -> int:
    return sv.log().count(f"spawned: '{name}'")


def test_status_lists_three_running_projects_with_fresh_canaries_and_the_scripts_agree(site, supervisord):
    names = ("youtility4", "django5", "bnp")
    _deploy(site, *(site.project(n) for n in names))
    sv = supervisord.start()
    infos = {n: _healthy_with_canary(site, sv, n) for n in names}

    r = site.host.mqttd("status", "--all", "--json")      # MQTTD_RUN_DIR is the site's run dir

    assert r.returncode == 0, r.stdout + r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == set(names)
    for n, row in rows.items():
        assert row["state"] == "running" and row["connected"] is True and row["healthy"] is True, row
        assert row["pid"] == infos[n]["pid"], row
        assert row["canary_age_s"] is not None and row["canary_age_s"] < 10, row

    # The cron wrappers: inventory as the first argument, or from $MQTTD_INVENTORY.
    r = _script(site, sv, "check_mqtt_health", str(site.inventory_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(f"{n}: healthy" for n in names)
    r = _script(site, sv, "mqtt_recovery", MQTTD_INVENTORY=str(site.inventory_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(f"{n}: RUNNING, healthy (pid {infos[n]['pid']})" for n in names)
    assert all(sv.info(f"{n}-mqtt")["pid"] == infos[n]["pid"] for n in names)      # nothing restarted
    r = _script(site, sv, "check_mqtt_health", str(site.root / "missing.toml"))
    assert r.returncode == 1 and "inventory file not found" in r.stderr, r.stdout + r.stderr


def test_a_zombie_after_a_broker_restart_without_sessions_is_unhealthy_and_recover_cures_it(site, supervisord):
    # Given bnp whose daemon will not subscribe again after its first connect (test hook)
    _deploy(site, site.project("bnp", environment={"TENANT_NO_RESUBSCRIBE": "1"}))
    sv = supervisord.start()
    old = _healthy_with_canary(site, sv)
    assert _health(site).stdout.strip() == "bnp: healthy: ok"
    ident = site.identity("bnp")

    # when the broker comes back without its sessions
    site.broker.stop()
    site.broker.wipe()
    site.broker.start()
    wait_status(ident.status_path, lambda s: s["session_gaps"] >= 1 and s["connected"], what="reconnected, no session")

    # then bnp is connected but unhealthy: its canary no longer comes back
    r = wait_until(lambda: (h := _health(site)).returncode == 1 and h, timeout=20, what="bnp unhealthy")
    assert r.stdout.startswith("bnp: unhealthy: last canary round trip "), r.stdout
    assert "(subscriptions lost or pipeline stuck)" in r.stdout
    assert sv.info("bnp-mqtt")["statename"] == "RUNNING"          # invisible to Supervisor
    r = _script(site, sv, "check_mqtt_health", str(site.inventory_path))
    assert r.returncode == 1 and r.stdout.startswith("bnp: UNHEALTHY: last canary round trip "), r.stdout

    # and the cron wrapper around `mqttd recover` restarts it through Supervisor
    r = _script(site, sv, "mqtt_recovery", str(site.inventory_path))

    assert r.returncode == 0, r.stdout + r.stderr
    new = sv.info("bnp-mqtt")
    assert new["statename"] == "RUNNING" and new["pid"] != old["pid"]
    assert re.fullmatch(rf"bnp: RUNNING \(pid {old['pid']}\) but UNHEALTHY: last canary round trip \d+s ago "
                        rf"\(subscriptions lost or pipeline stuck\): restarted, pid {new['pid']}, healthy\n", r.stdout)
    assert _health(site).returncode == 0
    assert len(_restarts(site)) == 1
    pub = Publisher(site.broker.port)
    try:
        pub.send("ble/dev-1/telemetry", {"seq": 7, "rssi": -50, "temp": 20})
        pub.wait_acked(1)
    finally:
        pub.close()
    wait_until(lambda: site.db.scalar("select count(*) from sensors_reading where seq = 7") == 1, what="stored")


def test_a_stuck_handler_shows_unhealthy_and_recover_restarts_it_without_losing_the_message(site, supervisord):
    marker = site.root / "stuck.marker"
    _deploy(site, site.project("bnp", environment={"TENANT_STUCK_ONCE": str(marker)}))
    sv = supervisord.start()
    old = _healthy_with_canary(site, sv)
    ident = site.identity("bnp")

    pub = Publisher(site.broker.port)
    try:
        pub.send("stuck/dev-9", "{}")
        pub.wait_acked(1)
    finally:
        pub.close()
    wait_until(marker.exists, what="the handler to get stuck")

    # The status file stays fresh (the main thread writes it) but canaries pile up behind the stuck batch.
    first = wait_status(ident.status_path, lambda s: s["backlog"] >= 2, what="a backlog")
    wait_status(ident.status_path, lambda s: s["backlog"] > first["backlog"], what="the backlog growing")
    r = wait_until(lambda: (h := _health(site)).returncode == 1 and h, timeout=20, what="bnp unhealthy")
    assert "last canary round trip" in r.stdout and "pipeline stuck" in r.stdout, r.stdout
    assert sv.info("bnp-mqtt")["pid"] == old["pid"]

    r = _recover(site, sv)

    assert r.returncode == 0, r.stdout + r.stderr
    new = sv.info("bnp-mqtt")
    assert new["pid"] != old["pid"]
    assert f"bnp: RUNNING (pid {old['pid']}) but UNHEALTHY: last canary" in r.stdout
    assert r.stdout.rstrip().endswith(f"restarted, pid {new['pid']}, healthy"), r.stdout
    # the stuck message was never acked, so the broker delivered it again to the new process
    wait_until(lambda: site.db.scalar("select count(*) from sensors_reading where source = 'stuck'") == 1,
               what="the stuck message stored after the restart")


def test_a_fatal_program_is_restarted_by_recover_once_it_is_fixed(site, supervisord):
    _deploy(site, site.project("bnp"))
    _fail_fast(site, "bnp")
    config = Path(site.project("bnp")["config"])
    good = config.read_text()
    config.write_text("[broker\n")                       # exits 78 at every start
    sv = supervisord.start()
    sv.wait_state("bnp-mqtt", "FATAL", never=())

    # while it is still broken, recover tries, fails, and says why in one line
    r = _recover(site, sv)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith("bnp: FATAL (Exited too quickly (process log may have details)): restart failed: "
                               "it failed to start; its last words: "), r.stdout
    assert "bnp.toml" in r.stdout and len(r.stdout.splitlines()) == 1
    sv.wait_state("bnp-mqtt", "FATAL", never=())

    # once the config is fixed, recover brings it back
    config.write_text(good)
    r = _recover(site, sv)

    assert r.returncode == 0, r.stdout + r.stderr
    info = sv.wait_state("bnp-mqtt", "RUNNING")
    assert r.stdout == f"bnp: FATAL (Exited too quickly (process log may have details)): restarted, pid {info['pid']}, healthy\n"
    assert lock.read_pid(site.identity("bnp").lock_path) == info["pid"]
    assert len(_restarts(site)) == 2


def test_a_lock_held_by_a_hand_started_process_is_named_and_left_alone(site, supervisord):
    bnp = site.project("bnp")
    _deploy(site, bnp)
    sv = supervisord.start()
    _healthy_with_canary(site, sv)
    sv.rpc.stopProcess("bnp-mqtt")
    # an operator starts bnp by hand, outside Supervisor, with the same run dir
    hand = site.host.start("bnp", Path(bnp["config"]), site.db)
    hand.wait_connected()
    lock_path = site.identity("bnp").lock_path

    r = _recover(site, sv)

    assert r.returncode == 1, r.stdout + r.stderr
    assert f"bnp: STOPPED; its lock {lock_path} is held by pid {hand.pid} (" in r.stdout, r.stdout
    assert "-m mqttd run --project bnp" in r.stdout
    assert "which Supervisor did not start: left alone" in r.stdout
    assert hand.proc.poll() is None and sv.info("bnp-mqtt")["statename"] == "STOPPED"

    # Supervisor trying to start bnp next to it (exit 75, BACKOFF): still named and left alone
    sv.rpc.startProcess("bnp-mqtt", False)
    sv.wait_state("bnp-mqtt", "BACKOFF", never=())
    r = _recover(site, sv)
    assert r.returncode == 1 and f"bnp: BACKOFF; its lock {lock_path} is held by pid {hand.pid} (" in r.stdout
    assert hand.proc.poll() is None and lock.read_pid(lock_path) == hand.pid
    assert sv.info("bnp-mqtt")["statename"] != "STOPPED"          # not stopped by recover
    assert _restarts(site) == []                                  # and no restart attempted


def test_the_crash_loop_brake_gives_up_after_three_restarts_and_says_until_when(site, supervisord):
    _deploy(site, site.project("bnp"))
    _fail_fast(site, "bnp")
    Path(site.project("bnp")["config"]).write_text("[broker\n")
    sv = supervisord.start()
    sv.wait_state("bnp-mqtt", "FATAL", never=())

    spawns = _spawns(sv)
    r = _recover(site, sv, "--dry-run")
    assert r.returncode == 1 and r.stdout.endswith(": would start bnp-mqtt:bnp-mqtt\n"), r.stdout
    assert _spawns(sv) == spawns and not (site.host.run_dir / "bnp.recover.json").exists()

    for _ in range(3):
        spawns = _spawns(sv)
        r = _recover(site, sv)
        assert r.returncode == 1 and "restart failed: it failed to start" in r.stdout, r.stdout
        sv.wait_state("bnp-mqtt", "FATAL", never=())
        assert _spawns(sv) > spawns

    spawns = _spawns(sv)
    r = _recover(site, sv)

    first = _restarts(site)[0]
    until = time.strftime("%H:%M", time.localtime(first + 3600))
    assert r.returncode == 1
    assert f": giving up until {until} (3 restarts in the last 60 min; see " in r.stdout, r.stdout
    time.sleep(1.0)                                    # a start would have been logged by now
    assert _spawns(sv) == spawns and sv.info("bnp-mqtt")["statename"] == "FATAL"
    assert len(_restarts(site)) == 3


def test_the_event_listener_restarts_a_fatal_program_and_honours_the_brake(site, supervisord):
    _deploy(site, site.project("bnp"))
    _fail_fast(site, "bnp")
    listener_log = site.root / "listener.log"
    (site.conf_dir / "mqttd-recover.conf").write_text(
        "[eventlistener:mqttd-recover]\n"
        f"command={VENV}/bin/python -m mqttd.ops.eventlistener --inventory {site.inventory_path}\n"
        "events=PROCESS_STATE_FATAL\nautorestart=true\nbuffer_size=50\n"
        f"stderr_logfile={listener_log}\n")
    config = Path(site.project("bnp")["config"])
    good = config.read_text()
    sv = supervisord.start()
    old = _healthy_with_canary(site, sv)
    sv.wait_state("mqttd-recover", "RUNNING")

    # bnp goes FATAL while the listener is down (events wait in supervisord's buffer) ...
    sv.rpc.stopProcess("mqttd-recover")
    config.write_text("[broker\n")
    os.kill(old["pid"], signal.SIGKILL)
    sv.wait_state("bnp-mqtt", "FATAL", never=())
    config.write_text(good)                              # ... and is fixed before the listener is back
    sv.rpc.startProcess("mqttd-recover")

    new = sv.wait_state("bnp-mqtt", "RUNNING", pid_not=old["pid"], never=())
    text = wait_until(lambda: "restarted" in (t := listener_log.read_text()) and t, timeout=40,
                      what="the listener's report")
    assert "bnp-mqtt is FATAL (was BACKOFF): recovering bnp" in text
    assert f"mqttd-recover: bnp: FATAL (Exited too quickly (process log may have details)): restarted, " \
           f"pid {new['pid']}, healthy" in text
    assert len(_restarts(site)) == 1

    # A program that stays broken: FATAL -> listener restart -> FATAL ... stops at the brake.
    config.write_text("[broker\n")
    os.kill(new["pid"], signal.SIGKILL)
    text = wait_until(lambda: "giving up until" in (t := listener_log.read_text()) and t, timeout=40,
                      what="the listener to give up")
    assert text.count("restart failed: it failed to start") == 2
    assert len(_restarts(site)) == 3
    sv.hold_state("bnp-mqtt", "FATAL", 1.5)
    assert sv.info("mqttd-recover")["statename"] == "RUNNING"


def test_a_supervised_copy_that_loses_a_client_id_fight_stays_exited_73_and_recover_leaves_it(site, supervisord):
    from lab.daemon import Host

    bnp = site.project("bnp")
    cfg = Path(bnp["config"])
    cfg.write_text(cfg.read_text().replace("[broker]\n", '[broker]\nclient_id = "shared-id"\n'))
    _deploy(site, bnp)
    conf = site.conf_dir / "bnp-mqtt.conf"
    # startsecs=1: the fight ends after the start counts as successful, so it is Supervisor's
    # autorestart (not a start retry) that must not resume it
    conf.write_text(conf.read_text().replace(f"startsecs={supervisor_conf.START_SECS}\n", "startsecs=1\n"))
    other = Host(site.root / "other-host")           # the misconfigured copy on "another host"
    first = other.start("bnp", cfg, site.db)
    try:
        first.wait_connected()
        sv = supervisord.start()
        info = sv.wait_state("bnp-mqtt", "EXITED", timeout=60, never=("FATAL",))
        assert info["exitstatus"] == 73, info
        assert "stopping instead of fighting" not in first.log()
        assert first.proc.poll() is None                            # the copy that was there first goes on
        sv.hold_state("bnp-mqtt", "EXITED", 4)                      # no autorestart back into the fight

        r = _recover(site, sv)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "bnp: EXITED 73: it stopped because another process uses its client id" in r.stdout, r.stdout
        assert "left alone" in r.stdout and _restarts(site) == []
        assert sv.info("bnp-mqtt")["statename"] == "EXITED"
    finally:
        other.reap()
