"""``python manage.py mqttd`` takes exactly ``mqttd run``'s options, built by the same code, and every
option of the command line has help text. The Django side runs in child processes: this pytest
process never sets Django up."""
from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import urllib.request

from lab.daemon import write_config
from lab.db import TENANT_DIR
from lab.waits import wait_until

from mqttd.cli import build_parser, main

# Prints the options of `manage.py mqttd` that Django's BaseCommand does not add itself.
_DUMP = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
import django
django.setup()
from django.core.management.base import BaseCommand
from mqttd.django.management.commands.mqttd import Command
base = {s for a in BaseCommand().create_parser("manage.py", "base")._actions for s in a.option_strings}
parser = Command().create_parser("manage.py", "mqttd")
print(json.dumps([{k: (v if k != "type" else getattr(v, "__name__", None)) for k, v in vars(a).items()
                   if k in ("option_strings", "dest", "default", "choices", "type", "help", "nargs", "const",
                            "required")}
                  for a in parser._actions if a.option_strings and not set(a.option_strings) & base]))
print("HELP>" + parser.format_help())
"""


def _describe(actions: list[argparse.Action]) -> list[dict]:
    keys = ("option_strings", "dest", "default", "choices", "type", "help", "nargs", "const", "required")
    return [{k: (getattr(a, k) if k != "type" else getattr(a.type, "__name__", None)) for k in keys}
            for a in actions if a.option_strings and a.dest != "help"]


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def _manage_py_options(env_extra: dict[str, str] | None = None) -> tuple[list[dict], str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTTD_", "TENANT_"))}
    env.update(DJANGO_SETTINGS_MODULE="tenant_site.settings", **(env_extra or {}))
    r = subprocess.run([sys.executable, "-c", _DUMP], cwd=TENANT_DIR, env=env, capture_output=True, text=True,
                       timeout=60, check=True)
    options, _, help_text = r.stdout.partition("HELP>")
    return json.loads(options), help_text


def test_manage_py_mqttd_has_exactly_the_options_of_mqttd_run(monkeypatch):
    monkeypatch.delenv("MQTTD_LOG_LEVEL", raising=False)
    theirs, help_text = _manage_py_options()
    ours = _describe(_run_parser()._actions)
    assert [o["option_strings"] for o in ours] == [["--project"], ["--instance"], ["--config"], ["--daemonize"],
                                                   ["--metrics-port"], ["--metrics-host"], ["--log-level"]]
    assert [{**o, "choices": o["choices"] and list(o["choices"])} for o in ours] == theirs
    run_help = _run_parser().format_help()
    for option in ("--project", "--instance", "--config", "--daemonize", "--metrics-port", "--metrics-host",
                   "--log-level"):
        assert option in help_text and option in run_help


def test_both_take_their_log_level_default_from_mqttd_log_level(monkeypatch):
    monkeypatch.setenv("MQTTD_LOG_LEVEL", "WARNING")
    assert _run_parser().get_default("log_level") == "WARNING"
    theirs, _ = _manage_py_options({"MQTTD_LOG_LEVEL": "WARNING"})
    assert next(o for o in theirs if o["dest"] == "log_level")["default"] == "WARNING"


def test_every_cli_option_has_help_text_and_help_names_the_short_form(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(a.option_strings)}" for name, p in sub.choices.items() for a in p._actions
               if a.option_strings and not (a.help or "").strip()]
    assert missing == []
    assert all((choice.help or "").strip() for choice in sub._choices_actions)
    try:
        main(["--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert "mqttd --project NAME" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_manage_py_mqttd_metrics_port_serves_metrics(host, broker, sqlite_db, tmp_path):
    cfg = write_config(tmp_path / "c.toml", broker.port)
    port = _free_port()
    env = host.env(**sqlite_db.env, DJANGO_SETTINGS_MODULE="tenant_site.settings")
    proc = subprocess.Popen([sys.executable, "manage.py", "mqttd", "--project", "bnp", "--config", str(cfg),
                             "--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--log-level", "DEBUG"],
                            cwd=TENANT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    host.procs.append(proc)
    status = host.run_dir / "bnp.status.json"
    wait_until(lambda: status.exists() and '"connected": true' in status.read_text(), 30, "connected")
    assert json.loads(status.read_text())["metrics_port"] == port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    assert 'mqttd_connected{mqttd_instance="",project="bnp"} 1.0' in text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
