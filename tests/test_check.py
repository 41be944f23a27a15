"""`mqttd check` refuses whatever `mqttd run` refuses at start, with the same exit code and message.

Each test builds one bad setup and runs both commands through the real CLI against a private
broker and the sample tenant; `run` must refuse before it consumes anything, `check` the same way.
"""
import socket
import subprocess

import pytest
from lab.broker import Broker, free_port
from lab.daemon import write_config
from lab.db import TENANT_DIR


def _both(host, cfg, db, *, env=None):
    """(check, run) results for one config. `run` is given a deadline: a run that is not
    refused keeps running, which is a failure here too."""
    check = host.mqttd("check", "--project", "bnp", "--config", str(cfg), "--timeout", "5", db=db, env=env)
    try:
        run = host.mqttd("run", "--project", "bnp", "--config", str(cfg), db=db, env=env, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`mqttd run` was not refused (still running after 20 s); check said: exit {check.returncode} "
                    f"{check.stderr.strip()}")
    return check, run


def _same_refusal(check, run, code: int, *words: str) -> None:
    for name, r in (("check", check), ("run", run)):
        err = r.stderr.strip()
        assert r.returncode == code, f"{name}: exit {r.returncode}: {err}\n{r.stdout[-2000:]}"
        assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, f"{name}: {err}"
        for w in words:
            assert w in err, f"{name}: {w!r} not in {err!r}"
    assert check.stderr.strip() == run.stderr.strip()


def _settings_without_the_mqttd_app(tmp_path):
    """A tenant settings module like the sample's, without mqttd.django in INSTALLED_APPS and with
    an app of its own whose route has a dedupe key."""
    d = tmp_path / "noapp"
    (d / "keyedapp").mkdir(parents=True)
    (d / "keyedapp" / "__init__.py").write_text("")
    (d / "keyedapp" / "mqtt_handlers.py").write_text(
        "from mqttd import Message, route\n\n\n"
        "@route('keyed/{device}', qos=1, dedupe=lambda msg: msg.topic)\n"
        "def save_keyed(msg: Message, device: str) -> None:\n"
        "    pass\n")
    (d / "noapp_settings.py").write_text(
        "from tenant_site.settings import *  # noqa: F403\n"
        "INSTALLED_APPS = [a for a in INSTALLED_APPS if a != 'mqttd.django'] + ['keyedapp']  # noqa: F405\n")
    return d


def _noapp_config(tmp_path, port, extra=""):
    d = _settings_without_the_mqttd_app(tmp_path)
    cfg = tmp_path / "noapp.toml"
    write_config(cfg, port, settings="noapp_settings", extra=extra)
    # The settings module lives in its own directory: add it to django.pythonpath.
    cfg.write_text(cfg.read_text().replace(f'pythonpath = ["{TENANT_DIR}"]', f'pythonpath = ["{TENANT_DIR}", "{d}"]'))
    return cfg


def test_a_dedupe_route_without_the_mqttd_app_is_refused_by_check_as_by_run(host, broker, sqlite_db, tmp_path):
    check, run = _both(host, _noapp_config(tmp_path, broker.port), sqlite_db)
    _same_refusal(check, run, 78, "noapp.toml", "django.settings", "keyedapp.mqtt_handlers.save_keyed",
                  "mqttd.django")


def test_dispatch_dedupe_property_without_the_mqttd_app_is_refused_by_check_as_by_run(host, broker, sqlite_db,
                                                                                         tmp_path):
    cfg = _noapp_config(tmp_path, broker.port, extra='[dispatch]\ndedupe_property = "msg-id"\n')
    check, run = _both(host, cfg, sqlite_db)
    _same_refusal(check, run, 78, "noapp.toml", "dispatch.dedupe_property", "mqttd.django")


def test_a_metrics_port_in_use_is_refused_by_check_as_by_run(host, broker, sqlite_db, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "c.toml", broker.port)
        cfg.write_text(cfg.read_text().replace("[status]\n", f"[status]\nmetrics_port = {port}\n"))
        check, run = _both(host, cfg, sqlite_db)
    _same_refusal(check, run, 78, "c.toml", "status.metrics_port", f"127.0.0.1:{port}")


def test_check_does_not_trip_over_the_metrics_port_of_the_running_daemon(host, broker, sqlite_db, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", broker.port)
    cfg.write_text(cfg.read_text().replace("[status]\n", f"[status]\nmetrics_port = {port}\n"))
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"metrics: 127.0.0.1:{port} not probed (the running daemon holds it)" in r.stdout
    assert d.stop() == 0
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
    assert r.returncode == 0 and f"metrics: can listen on 127.0.0.1:{port}" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("which", ["ca_certs", "certfile"])
def test_a_tls_file_that_is_not_a_certificate_is_refused_by_check_as_by_run(host, broker, sqlite_db, tmp_path,
                                                                              which):
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    cfg = write_config(tmp_path / "c.toml", broker.port, broker_extra=f'tls = {{ {which} = "{junk}" }}')
    check, run = _both(host, cfg, sqlite_db)
    _same_refusal(check, run, 78, "c.toml", f"broker.tls.{which}", str(junk))


@pytest.mark.parametrize("what,settings,extra,words", [
    ("settings module that does not import", "no_such_settings_module", "",
     ["django.settings", "no_such_settings_module"]),
    ("handler that does not import", "tenant_site.settings",
     '[[subscribe]]\ntopic = "x/+"\nhandler = "no_such_module.handler"\n', ["subscribe[0].handler", "no_such_module"]),
])
def test_tenant_and_route_errors_are_refused_by_check_as_by_run(host, broker, sqlite_db, tmp_path, what, settings,
                                                                extra, words):
    cfg = write_config(tmp_path / "c.toml", broker.port, settings=settings, extra=extra)
    check, run = _both(host, cfg, sqlite_db)
    _same_refusal(check, run, 78, "c.toml", *words)


def test_credentials_refused_by_the_broker_are_refused_by_check_as_by_run(host, sqlite_db, tmp_path):
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "tenant", "right"], check=True, capture_output=True)
    pwfile.chmod(0o644)
    b = Broker(tmp_path / "authbroker", extra=f"allow_anonymous false\npassword_file {pwfile}").start()
    try:
        secret = tmp_path / "secret"
        secret.write_text("wrong\n")
        cfg = write_config(tmp_path / "c.toml", b.port, broker_extra=f'username = "tenant"\npassword_file = "{secret}"')
        check, run = _both(host, cfg, sqlite_db)
    finally:
        b.stop()
    for name, r in (("check", check), ("run", run)):
        assert r.returncode == 78, f"{name}: {r.returncode} {r.stderr}"
        assert "refused" in r.stderr and "broker.username" in r.stderr, f"{name}: {r.stderr}"
        assert "Traceback" not in r.stderr


def test_session_expiry_0_is_valid_and_warned_about_by_check_and_run(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port, broker_extra="session_expiry = 0")
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: broker.session_expiry = 0:" in r.stdout and "lost" in r.stdout
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    assert d.stop() == 0
    assert "WARNING" in d.log() and "broker.session_expiry = 0:" in d.log()
