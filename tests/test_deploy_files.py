"""`mqttd deploy` as a careful file writer: it refuses a bad inventory with one line, shows a diff
on --dry-run without touching anything, and never overwrites or deletes a file it did not write."""
from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lab.daemon import write_config
from lab.publish import Publisher
from lab.supervisor import VENV, Supervisord
from lab.waits import wait_until

from mqttd.deploy import render as supervisor_conf
from mqttd.deploy.inventory import load_inventory

CELERY = "[program:celery]\ncommand=/srv/bnp/venv/bin/celery worker\n"
HAND_BNP = "; my own bnp entry\n[program:bnp-mqtt]\ncommand=/usr/bin/true\n"


def _one_line_failure(r) -> str:  # noqa: ANN001
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("case, expected", [
    ("same name twice", r"projects 'bnp' and 'bnp' would share the name bnp"),
    ("instance collides with a project", r"projects 'bnp' and 'bnp-1' would share the lock .*/bnp-1\.pid"),
    ("shared log dir", r"projects 'bnp' and 'bnp-1' would share the log dir .*/log/bnp-1"),
    ("explicit client id", r"projects 'youtility4' and 'bnp' would share the client ID bnp-"),
    ("bad name", r"project\[0\]\.name: invalid project name '\.\./x': it must match \^\[a-z0-9\]"),
    ("no bin/mqttd", r"project\[bnp\]\.venv: no executable bin/mqttd in /"),
    ("missing config", r"project\[bnp\]\.config: config file .*/nowhere\.toml not found"),
    ("unknown key", r"project\[bnp\]\.nprocs: unknown key"),
    ("secret in environment", r"project\[bnp\]\.environment\.MQTTD_BROKER_PASSWORD: looks like a secret"),
    ("numprocs with a fixed client id", r"project\[bnp\]\.numprocs: 2 processes would share broker\.client_id"),
    ("run dir shared by two users", r"run_dir .* is shared by 'youtility4' \(user .*\) and 'bnp' \(user nobody\)"),
])
def test_a_conflicting_or_broken_inventory_is_refused_in_one_line(site, tmp_path, case, expected):
    bnp = site.project("bnp")
    if case == "same name twice":
        site.inventory(bnp, site.project("bnp"))
    elif case == "instance collides with a project":
        site.inventory({**bnp, "numprocs": 2}, site.project("bnp-1"))
    elif case == "shared log dir":
        site.inventory({**bnp, "numprocs": 2}, site.project("bnp-1", run_dir=str(tmp_path / "other-run")))
    elif case == "explicit client id":
        other = site.project("youtility4")
        Path(other["config"]).write_text(Path(other["config"]).read_text().replace(
            "[broker]\n", f'[broker]\nclient_id = "{site.identity("bnp").client_id}"\n'))
        site.inventory(other, bnp)
    elif case == "bad name":
        site.inventory({**bnp, "name": "../x"})
    elif case == "no bin/mqttd":
        site.inventory({**bnp, "venv": str(tmp_path)})
    elif case == "missing config":
        site.inventory({**bnp, "config": str(tmp_path / "nowhere.toml")})
    elif case == "unknown key":
        site.inventory({**bnp, "nprocs": 2})
    elif case == "secret in environment":
        site.inventory({**bnp, "environment": {"MQTTD_BROKER_PASSWORD": "hunter2"}})
    elif case == "numprocs with a fixed client id":
        Path(bnp["config"]).write_text(Path(bnp["config"]).read_text().replace(
            "[broker]\n", '[broker]\nclient_id = "bnp-fixed"\n'))
        site.inventory({**bnp, "numprocs": 2})
    elif case == "run dir shared by two users":
        site.inventory(site.project("youtility4"), {**bnp, "user": "nobody"})
    before = site.snapshot()

    line = _one_line_failure(site.deploy())

    assert re.search(expected, line), line
    assert str(site.inventory_path) in line
    assert "hunter2" not in line
    assert site.snapshot() == before


def test_dry_run_prints_a_diff_and_changes_nothing(site):
    site.inventory(site.project("bnp"), site.project("django5"))
    before = site.snapshot()

    r = site.deploy("--dry-run")

    assert r.returncode == 0, r.stderr
    assert f"+++ {site.conf_dir}/bnp-mqtt.conf" in r.stdout
    assert f"+command={VENV}/bin/mqttd run" in r.stdout
    assert "dry run: 2 file(s) to write, 0 to remove, 0 unchanged; nothing was changed" in r.stdout
    assert site.snapshot() == before          # no conf file, no log or run dir

    # After a real deploy, a dry run shows exactly the coming changes
    assert site.deploy().returncode == 0
    site.inventory(site.project("bnp", numprocs=2))
    before = site.snapshot()
    r = site.deploy("--dry-run")
    assert r.returncode == 0, r.stderr
    assert "+numprocs=2" in r.stdout
    assert '-environment=MQTTD_PROJECT="bnp",MQTTD_CONFIG=' in r.stdout
    assert f"--- {site.conf_dir}/django5-mqtt.conf\n+++ /dev/null" in r.stdout
    assert "dry run: 1 file(s) to write, 1 to remove, 0 unchanged" in r.stdout
    assert site.snapshot() == before


def test_hand_written_files_survive_and_are_never_overwritten(site):
    celery = site.conf_dir / "celery.conf"
    celery.write_text(CELERY)
    hand_bnp = site.conf_dir / "bnp-mqtt.conf"
    hand_bnp.write_text(HAND_BNP)

    # A project that would take the hand-written file's name is refused, and nothing is written
    site.inventory(site.project("youtility4"), site.project("bnp"))
    line = _one_line_failure(site.deploy())
    assert f"{hand_bnp} was not written by mqttd deploy: refusing to overwrite it" in line
    assert hand_bnp.read_text() == HAND_BNP
    assert not (site.conf_dir / "youtility4-mqtt.conf").exists()

    # Without bnp the deploy goes ahead around both hand-written files
    site.inventory(site.project("youtility4"), site.project("django5"))
    r = site.deploy()
    assert r.returncode == 0, r.stderr
    assert (site.conf_dir / "youtility4-mqtt.conf").exists()

    # Dropping projects removes only generated files
    site.inventory(site.project("django5"))
    r = site.deploy()
    assert r.returncode == 0, r.stderr
    assert f"removed {site.conf_dir}/youtility4-mqtt.conf (no longer in the inventory)" in r.stdout
    assert sorted(p.name for p in site.conf_dir.iterdir()) == ["bnp-mqtt.conf", "celery.conf", "django5-mqtt.conf"]
    assert celery.read_text() == CELERY and hand_bnp.read_text() == HAND_BNP


def test_a_hand_written_section_with_a_generated_name_is_refused(site):
    legacy = site.conf_dir / "legacy.conf"
    legacy.write_text("[program:django5-mqtt]\ncommand=/usr/bin/true\n")
    site.inventory(site.project("django5"))

    line = _one_line_failure(site.deploy())

    assert f"{legacy} already defines [program:django5-mqtt]" in line
    assert sorted(p.name for p in site.conf_dir.iterdir()) == ["legacy.conf"]


def test_a_generated_file_edited_by_hand_is_neither_overwritten_nor_deleted(site):
    site.inventory(site.project("bnp"), site.project("django5"))
    assert site.deploy().returncode == 0
    conf = site.conf_dir / "django5-mqtt.conf"
    edited = conf.read_text().replace("startsecs=5", "startsecs=1")
    conf.write_text(edited)

    site.inventory(site.project("bnp", numprocs=2), site.project("django5", numprocs=2))
    line = _one_line_failure(site.deploy())
    assert f"{conf} was edited by hand after mqttd deploy wrote it: refusing to overwrite" in line
    site.inventory(site.project("bnp"))
    line = _one_line_failure(site.deploy())
    assert f"{conf} was edited by hand after mqttd deploy wrote it: refusing to delete" in line
    assert conf.read_text() == edited


def test_generated_entry_runs_mqttd_directly_and_holds_no_secret(site, tmp_path):
    secret = "s3cr3t-broker-pass"
    (tmp_path / "bnp.secret").write_text(secret)
    bnp = site.project("bnp", numprocs=3)
    Path(bnp["config"]).write_text(Path(bnp["config"]).read_text().replace(
        "[broker]\n", f'[broker]\nusername = "bnp"\npassword_file = "{tmp_path}/bnp.secret"\n'))
    site.inventory(bnp, environment={**site.db.env, "DJANGO_NOTE": "100% ok, really"})

    r = site.host.mqttd("deploy", "--inventory", str(site.inventory_path), "--conf-dir", str(site.conf_dir),
                        env={"MQTTD_BROKER_PASSWORD": secret})

    assert r.returncode == 0, r.stderr
    text = (site.conf_dir / "bnp-mqtt.conf").read_text()
    assert secret not in text and secret not in r.stdout + r.stderr
    assert text.startswith(supervisor_conf.MARKER)
    assert f"command={VENV}/bin/mqttd run\n" in text and "sh -c" not in text
    for line in ("numprocs=3", "process_name=%(program_name)s-%(process_num)d", "stopsignal=TERM",
                 "stopwaitsecs=30", "stopasgroup=true", "killasgroup=true", "autorestart=unexpected", "exitcodes=0,73",
                 f"stdout_logfile={site.host.log_dir}/bnp/supervisor-%(process_num)d.log"):
        assert f"\n{line}\n" in text, line
    assert 'MQTTD_INSTANCE="%(process_num)d"' in text
    assert 'DJANGO_NOTE="100%% ok, really"' in text
    for i in range(3):     # each instance's own log dir exists, 0750
        assert (site.host.log_dir / f"bnp-{i}").stat().st_mode & 0o777 == 0o750
    assert site.host.run_dir.stat().st_mode & 0o777 == 0o750


def test_status_lists_every_instance_of_the_inventory(site):
    inv = load_inventory(site.inventory(site.project("youtility4"), site.project("bnp", numprocs=2)))

    names = [i.name for i in inv.identities(os.environ)]

    assert names == ["youtility4", "bnp-0", "bnp-1"]
    assert {i.run_dir for i in inv.identities(os.environ)} == {site.host.run_dir}
    r = site.host.mqttd("status", "--inventory", str(site.inventory_path))
    assert r.returncode == 1 and "bnp-1" in r.stdout and "not running" in r.stdout, r.stdout + r.stderr


def test_apply_reports_supervisor_problems_in_one_line(site, tmp_path):
    site.inventory(site.project("bnp"))
    before = site.snapshot()
    line = _one_line_failure(site.deploy("--apply", "--supervisor-url", f"unix://{tmp_path}/none.sock"))
    assert line.startswith(f"cannot reach supervisord at unix://{tmp_path}/none.sock")
    assert site.snapshot() == before          # checked before anything was written

    line = _one_line_failure(site.deploy("--apply", "--supervisor-url", "http://admin:pw@127.0.0.1:9001"))
    assert "must not hold credentials" in line and "pw@" not in line

    line = _one_line_failure(site.deploy("--dry-run", "--apply"))
    assert "not both" in line


def test_apply_refuses_a_supervisord_that_does_not_include_the_conf_dir(site, tmp_path):
    other = tmp_path / "other-conf.d"
    other.mkdir()
    sv = Supervisord(tmp_path / "sv", other, site.host.env()).start()
    try:
        site.inventory(site.project("bnp"))
        line = _one_line_failure(site.deploy("--apply", "--supervisor-url", sv.url))
        assert "supervisord does not know bnp-mqtt" in line
        assert f"[include] files = {site.conf_dir}/*.conf" in line
    finally:
        sv.stop()


# --- The shipped systemd unit and logrotate file, checked by their real consumers ---------------

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_the_systemd_template_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (the unit is verified where it is)")
    mqttd_bin = Path(sys.executable).with_name("mqttd")
    assert mqttd_bin.exists(), mqttd_bin
    unit = (DEPLOY / "systemd" / "mqttd@.service").read_text()
    assert "ExecStart=/home/redmine/envs/%i/bin/mqttd run\n" in unit
    # The template's venv path exists on no test machine: point it at this venv's mqttd, keep the rest
    (tmp_path / "mqttd@.service").write_text(unit.replace("/home/redmine/envs/%i/bin/mqttd", str(mqttd_bin)))

    r = subprocess.run([analyze, "verify", str(tmp_path / "mqttd@bnp.service")], capture_output=True, text=True,
                       timeout=120)

    ours = [line for line in (r.stdout + r.stderr).splitlines() if "mqttd" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def _rotated(log_dir: Path) -> list[Path]:
    return sorted(p for p in log_dir.iterdir() if p.name.startswith("mqttd.log-"))


def _read(path: Path) -> str:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode()


def test_logrotate_twice_in_a_day_while_the_daemon_logs_loses_no_line(host, broker, sqlite_db, tmp_path):
    """The shipped logrotate file with the real logrotate, forced twice on the same day (maxsize
    does that on a busy host), while mqttd keeps logging: both rotations happen, every line is in
    exactly one file, and mqttd writes to the new mqttd.log after each."""
    logrotate = shutil.which("logrotate") or ("/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None)
    if logrotate is None:
        pytest.skip("logrotate is not installed (Debian: apt-get install logrotate)")
    conf = tmp_path / "logrotate.conf"
    conf.write_text((DEPLOY / "logrotate" / "mqttd").read_text().replace("/var/log/mqttd/", f"{host.log_dir}/"))
    state = tmp_path / "logrotate.state"
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db)
    d.wait_for(lambda s: s.get("connected") and s.get("canary_at"), what="canary")
    log_dir = d.log_path.parent
    pub = Publisher(broker.port)
    sent = 0

    def log_markers(tag: str, n: int = 5) -> list[str]:
        """Make mqttd log n lines we can recognise: a handler failure names the topic."""
        nonlocal sent
        topics = [f"ble/{tag}-{i}/telemetry" for i in range(n)]
        for t in topics:
            pub.send(t, b"not json")
        sent += n
        pub.wait_acked(sent)
        wait_until(lambda: all(t in d.log() for t in topics), 30, f"{tag} lines in the current mqttd.log")
        return topics

    markers = log_markers("before")
    for rotation in (1, 2):
        time.sleep(1.1)       # rotated names carry the time to the second
        r = subprocess.run([logrotate, "-f", "-s", str(state), str(conf)], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (0, ""), r.stdout + r.stderr
        assert len(_rotated(log_dir)) == rotation
        assert not d.log_path.exists() or "-after-" not in d.log()
        markers += log_markers(f"after-{rotation}")          # reopened: they land in the new file
    pub.close()

    rotated = _rotated(log_dir)
    assert [p.name.endswith(".gz") for p in rotated] == [True, False], rotated   # delaycompress: newest stays plain
    assert all(re.fullmatch(r"mqttd\.log-\d{8}-\d{6}(\.gz)?", p.name) for p in rotated), rotated
    texts = [_read(p) for p in (*rotated, d.log_path)]
    assert "before-0" in texts[0] and "after-1-0" in texts[1] and "after-2-0" in texts[2]
    for topic in markers:
        assert sum(t.count(f" {topic}:") for t in texts) == 1, topic
    assert d.stop() == 0
    assert "stopped cleanly" in d.log()
