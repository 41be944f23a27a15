"""The seed story: three Django projects on one host, each with its own lock, client id and logs."""
import os
import signal
import time

import pytest
from lab.daemon import write_config

from mqttd.daemon.lock import is_held, read_pid
from mqttd.identity import short_hostname

PROJECTS = ("youtility4", "django5", "bnp")


def test_three_projects_run_at_once_and_a_second_bnp_exits_75_naming_the_first(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    daemons = {p: host.start(p, cfg, sqlite_db) for p in PROJECTS}
    for p, d in daemons.items():
        st = d.wait_connected()
        assert st["client_id"] == f"{p}-{short_hostname()}"
        lock = host.run_dir / f"{p}.pid"
        assert is_held(lock) and read_pid(lock) == d.pid
        assert (host.log_dir / p / "mqttd.log").exists()
    pid_file = host.run_dir / "bnp.pid"
    before = pid_file.read_bytes()

    second = host.mqttd("run", "--project", "bnp", "--config", str(cfg), db=sqlite_db)

    first = daemons["bnp"].pid
    assert second.returncode == 75
    assert second.stderr.strip() == f"mqttd[bnp]: already running as pid {first} (lock {pid_file})"
    assert pid_file.read_bytes() == before
    assert daemons["bnp"].proc.poll() is None
    for d in daemons.values():
        assert d.stop() == 0


def test_after_kill_9_a_new_bnp_starts_at_once(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    first = host.start("bnp", cfg, sqlite_db)
    first.wait_connected()
    first.kill()
    t0 = time.monotonic()
    second = host.start("bnp", cfg, sqlite_db)
    st = second.wait_connected()
    assert st["pid"] == second.pid and read_pid(host.run_dir / "bnp.pid") == second.pid
    assert time.monotonic() - t0 < 10
    assert second.stop() == 0


def test_instances_of_one_project_have_their_own_locks(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    a = host.start("bnp", cfg, sqlite_db, "--instance", "0")
    b = host.start("bnp", cfg, sqlite_db, "--instance", "1")
    assert a.wait_connected()["client_id"] != b.wait_connected()["client_id"]
    assert read_pid(host.run_dir / "bnp-0.pid") == a.pid and read_pid(host.run_dir / "bnp-1.pid") == b.pid
    assert a.stop() == 0 and b.stop() == 0


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "has space", "UPPER"])
def test_every_invalid_name_exits_2_with_the_rule(host, bad):
    r = host.mqttd("--project", bad)
    assert r.returncode == 2, r.stderr
    assert "^[a-z0-9][a-z0-9_-]{0,62}$" in r.stderr and "Traceback" not in r.stderr


def test_invalid_name_from_the_environment_exits_2(host):
    r = host.mqttd("run", env={"MQTTD_PROJECT": "../../etc"})
    assert r.returncode == 2 and "must match" in r.stderr


def test_no_project_at_all_is_a_usage_error(host):
    r = host.mqttd("run")
    assert r.returncode == 2 and "--project" in r.stderr


def test_daemonize_writes_the_daemons_pid_and_a_refused_start_exits_75_before_detaching(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    r = host.mqttd("run", "--project", "bnp", "--config", str(cfg), "--daemonize", db=sqlite_db)
    assert r.returncode == 0, r.stderr
    lock = host.run_dir / "bnp.pid"
    # The daemon takes the flock an instant before it writes its PID: wait for both.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (is_held(lock) and read_pid(lock)):
        time.sleep(0.05)
    pid = read_pid(lock)
    try:
        assert is_held(lock) and pid and pid != os.getpid()
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        assert b"--daemonize" in cmdline
        # Refused in the foreground: exit 75 and the message names the daemon's pid.
        again = host.mqttd("run", "--project", "bnp", "--config", str(cfg), "--daemonize", db=sqlite_db)
        assert again.returncode == 75 and f"pid {pid}" in again.stderr
        assert read_pid(lock) == pid
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and is_held(lock):
                time.sleep(0.05)
    assert not is_held(lock)


def test_daemonize_is_ignored_under_supervisor(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, sqlite_db, "--daemonize", env={"SUPERVISOR_ENABLED": "1"})
    st = d.wait_connected()
    assert st["pid"] == d.pid          # still the process Supervisor started
    assert d.stop() == 0


def test_version_and_help(host):
    assert host.mqttd("--version").stdout.startswith("mqttd ")
    r = host.mqttd("--help")
    assert r.returncode == 0 and "deploy" in r.stdout and "health" in r.stdout


def test_a_start_that_loses_to_a_holder_not_yet_done_writing_its_pid_still_names_it(tmp_path):
    # A holder takes the flock first and writes its PID an instant later; here the instant is
    # stretched to 0.8 s, past the loser's 0.5 s of retrying the lock. The loser's refusal must
    # still name the holder, not "an unknown pid".
    import subprocess
    import sys

    from mqttd.daemon.lock import ProjectLock
    from mqttd.errors import LockHeld

    path = tmp_path / "bnp.pid"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT, 0o640)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(0.8)\n"
        "os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0)\n"
        "time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert read_pid(path) is None
        with pytest.raises(LockHeld) as refused:
            ProjectLock("bnp", path).acquire()
        assert refused.value.pid == holder.pid
        assert f"pid {holder.pid}" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
