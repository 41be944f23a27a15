"""The dead-letter screen in a real headless Chromium, as an operator uses it.

The daemon turns two failing messages into dead letters; the bug is then fixed (TENANT_FIXED=1 in
the web process), the tenant's admin is served by ``manage.py runserver`` on a free loopback port,
and Chromium (Debian's ``chromium``, driven by Playwright through ``executable_path``) logs in
through the login form, opens the dead letters, selects one, runs *Replay selected*, and sees it
gone from the list while its row is stored. Screenshots are kept as test artifacts: under the
test's tmp dir and copied to ``$MQTTD_ARTIFACT_DIR`` (default /tmp/mqttd-admin-artifacts/).

Without chromium or Playwright the test is skipped locally and fails in CI (CI=true).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from lab.daemon import write_config
from lab.db import TENANT_DIR
from lab.publish import Publisher, telemetry
from lab.waits import wait_rows

ARTIFACT_DIR = Path(os.environ.get("MQTTD_ARTIFACT_DIR", "/tmp/mqttd-admin-artifacts"))


def _need(what: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} is missing")


def _chromium() -> str:
    path = os.environ.get("MQTTD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        _need("Debian's chromium (apt-get install chromium; scripts/setup installs it as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _need("Playwright for Python (pip install -e '.[test]')")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"runserver exited {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return                        # it answers
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"runserver did not answer on {url} within {timeout}s:\n{log.read_text()}")


def _keep(shot: Path) -> Path:
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    kept = ARTIFACT_DIR / shot.name
    shutil.copyfile(shot, kept)
    print(f"screenshot: {shot}  (copy: {kept})")
    return kept


def test_operator_replays_a_dead_letter_in_chromium(host, broker, sqlite_db, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    # Two dead letters made by the real daemon: its handler fails on {"fail": true}.
    cfg = write_config(tmp_path / "c.toml", broker.port)
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    pub = Publisher(broker.port)
    pub.send("ble/dev-1/telemetry", telemetry(1, fail=True))
    pub.send("ble/dev-2/telemetry", telemetry(2, fail=True))
    pub.wait_acked(2)
    pub.close()
    wait_rows(sqlite_db, 2, table="mqttd_deadletter")
    assert d.stop() == 0

    # The bug is fixed (TENANT_FIXED); the admin runs in its own web process.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTTD_", "TENANT_"))}
    env.update(sqlite_db.env, DJANGO_SETTINGS_MODULE="tenant_site.settings", TENANT_FIXED="1", PYTHONUNBUFFERED="1",
               DJANGO_SUPERUSER_PASSWORD="operator-pw-1")
    subprocess.run([sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "operator",
                    "--email", "operator@example.com"], cwd=TENANT_DIR, env=env, check=True, capture_output=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "runserver.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
                                  cwd=TENANT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT)
    host.procs.append(server)
    try:
        _wait_http(f"{base}/admin/login/", server, log)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"{base}/admin/")
                # Not logged in: the admin sends us to its login form.
                expect(page).to_have_url(f"{base}/admin/login/?next=/admin/")
                page.fill("#id_username", "operator")
                page.fill("#id_password", "operator-pw-1")
                page.click("input[type=submit]")
                expect(page.locator("#content h1")).to_have_text("Site administration")

                page.click("text=Dead letters")
                expect(page.locator("#content h1")).to_have_text("Dead letters")
                rows = page.locator("#result_list tbody tr")
                expect(rows).to_have_count(2)
                expect(rows.filter(has_text="ValueError: told to fail (seq 1)")).to_have_count(1)
                shot_before = tmp_path / "mqttd-admin-dead-letters-before.png"
                page.screenshot(path=str(shot_before), full_page=True)

                # The detail view: the payload as pretty JSON, the error and its traceback.
                rows.filter(has_text="ble/dev-2/telemetry").locator("th a").click()
                expect(page.locator("#content h1")).to_have_text("View dead letter")
                expect(page.locator(".field-payload_shown pre")).to_contain_text('"fail": true')
                expect(page.locator(".field-traceback_shown pre")).to_contain_text("told to fail (seq 2)")
                shot_detail = tmp_path / "mqttd-admin-dead-letter-detail.png"
                page.screenshot(path=str(shot_detail), full_page=True)
                page.go_back()

                # Select the first letter and run *Replay selected*.
                rows.filter(has_text="ble/dev-1/telemetry").locator("input.action-select").check()
                page.select_option("select[name=action]", "replay_selected")
                page.click("button[name=index]")
                expect(page.locator("ul.messagelist")).to_contain_text("Replayed 1 dead letter: handled and deleted.")
                expect(rows).to_have_count(1)
                expect(page.locator("#result_list")).not_to_contain_text("ble/dev-1/telemetry")
                expect(page.locator("#result_list")).to_contain_text("ble/dev-2/telemetry")
                shot = tmp_path / "mqttd-admin-replayed.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(10)
    for s in (shot_before, shot_detail, shot):
        _keep(s)

    # In the database: the replayed letter is gone and its reading stored; the other one stays.
    assert sqlite_db.query("select device, seq from sensors_reading") == [("dev-1", 1)]
    assert sqlite_db.query("select topic, attempts from mqttd_deadletter") == [("ble/dev-2/telemetry", 1)]
    assert "POST /admin/mqttd/deadletter/" in log.read_text()
