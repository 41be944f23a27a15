"""A private, real supervisord for one test, plus helpers to write inventories and wait on states.

supervisord runs in the foreground (``-n``) as a child of the test, on its own unix socket,
with ``[include] files = CONF_DIR/*.conf`` so that `mqttd deploy` output is what it runs. Teardown
stops supervisord (which stops its programs, TERM then KILL after stopwaitsecs) and afterwards
SIGKILLs only pids this supervisord reported as its children, if one is somehow left.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
from supervisor.xmlrpc import SupervisorTransport

VENV = Path(sys.executable).parent.parent
SUPERVISORD = VENV / "bin" / "supervisord"
SUPERVISORCTL = VENV / "bin" / "supervisorctl"


class Supervisord:
    def __init__(self, workdir: Path, conf_dir: Path, env: dict[str, str]) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf_dir = conf_dir
        self.env = env
        # A unix socket path must stay under 108 bytes; pytest's tmp paths can be longer.
        self._sockdir = Path(tempfile.mkdtemp(prefix="mqttd-sv-", dir="/tmp"))
        self.socket = self._sockdir / "supervisor.sock"
        self.url = f"unix://{self.socket}"
        self.conf = self.dir / "supervisord.conf"
        self.logfile = self.dir / "supervisord.log"
        self.proc: subprocess.Popen | None = None
        self.children: set[int] = set()

    def write_conf(self) -> None:
        self.conf.write_text(
            f"[unix_http_server]\nfile = {self.socket}\nchmod = 0700\n\n"
            f"[supervisord]\nlogfile = {self.logfile}\npidfile = {self.dir}/supervisord.pid\n"
            f"childlogdir = {self.dir}\nloglevel = info\nnodaemon = true\n\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl = {self.url}\n\n"
            f"[include]\nfiles = {self.conf_dir}/*.conf\n"
        )

    def start(self, timeout: float = 15.0) -> Supervisord:
        self.write_conf()
        self.proc = subprocess.Popen([str(SUPERVISORD), "-n", "-c", str(self.conf)], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisord exited {self.proc.returncode}:\n{self.log()[-2000:]}")
            try:
                if self.rpc.getState()["statename"] == "RUNNING":
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"supervisord did not come up:\n{self.log()[-2000:]}")

    @property
    def rpc(self) -> Any:
        """A fresh proxy to the `supervisor.` namespace (a proxy is cheap, and not thread-safe)."""
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, self.url))
        return proxy.supervisor

    def info(self, name: str) -> dict[str, Any]:
        info = self.rpc.getProcessInfo(name)
        if info["pid"]:
            self.children.add(info["pid"])
        return info

    def all_info(self) -> list[dict[str, Any]]:
        infos = self.rpc.getAllProcessInfo()
        self.children.update(i["pid"] for i in infos if i["pid"])
        return infos

    def wait_state(self, name: str, state: str, timeout: float = 30.0, never: tuple[str, ...] = ("FATAL",),
                   pid_not: int | None = None) -> dict[str, Any]:
        """Poll until ``name`` is in ``state`` (and, if given, runs a pid other than ``pid_not``);
        fail at once if it passes through a state in ``never``."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            info = self.info(name)
            if info["statename"] in never:
                raise AssertionError(f"{name} went {info['statename']}: {info['description']}\n"
                                     f"{self.tail(name)}")
            if info["statename"] == state and (pid_not is None or info["pid"] != pid_not):
                return info
            time.sleep(0.1)
        raise AssertionError(f"{name} not {state} within {timeout}s: {info}\n{self.tail(name)}")

    def hold_state(self, name: str, state: str, seconds: float) -> None:
        """Assert ``name`` stays in ``state`` for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            info = self.info(name)
            assert info["statename"] == state, f"{name} left {state}: {info}\n{self.tail(name)}"
            time.sleep(0.2)

    def tail(self, name: str) -> str:
        try:
            return self.rpc.tailProcessStdoutLog(name, 0, 3000)[0]
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            return f"(no log: {exc})"

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """The real supervisorctl against this supervisord."""
        return subprocess.run([str(SUPERVISORCTL), "-c", str(self.conf), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        try:
            return self.logfile.read_text()
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.all_info()
            except Exception:  # noqa: BLE001 - it may be on its way down already
                pass
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in self.children:
            if _is_mqttd(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc = None
        shutil.rmtree(self._sockdir, ignore_errors=True)


def _is_mqttd(pid: int) -> bool:
    """Only a live process still running mqttd (a recycled pid is left alone)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"mqttd" in cmdline


def write_inventory(path: Path, projects: list[dict[str, Any]], **defaults: Any) -> Path:
    """A TOML inventory: ``defaults`` become [defaults], each dict a [[project]] table."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["[defaults]"] + [f"{k} = {value(v)}" for k, v in defaults.items()]
    for p in projects:
        lines += ["", "[[project]]"] + [f"{k} = {value(v)}" for k, v in p.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Site:
    """One host for deploy tests: a conf dir, per-project configs and the inventory that lists
    them, all pointing at the test broker and the sample tenant's database."""

    def __init__(self, root: Path, host: Any, broker: Any, db: Any) -> None:
        from .db import TENANT_DIR

        self.root, self.host, self.broker, self.db = root, host, broker, db
        self.conf_dir = root / "conf.d"
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.inventory_path = root / "inventory.toml"
        self.defaults: dict[str, Any] = {
            "user": getpass.getuser(), "venv": str(VENV), "directory": str(TENANT_DIR),
            "log_dir": str(host.log_dir), "run_dir": str(host.run_dir), "environment": dict(db.env),
        }

    def project(self, name: str, **keys: Any) -> dict[str, Any]:
        """A [[project]] table with its own config file (short keepalive and status interval)."""
        from .daemon import write_config

        config = write_config(self.root / f"{name}.toml", self.broker.port)
        return {"name": name, "config": str(config), **keys}

    def inventory(self, *projects: dict[str, Any], **defaults: Any) -> Path:
        return write_inventory(self.inventory_path, list(projects), **{**self.defaults, **defaults})

    def deploy(self, *args: str, inventory: Path | None = None) -> subprocess.CompletedProcess:
        """The real CLI: mqttd deploy --inventory ... --conf-dir ... ARGS."""
        return self.host.mqttd("deploy", "--inventory", str(inventory or self.inventory_path),
                               "--conf-dir", str(self.conf_dir), *args)

    def identity(self, name: str, instance: int | None = None):  # noqa: ANN201
        from mqttd.identity import derive

        return derive(name, instance, self.host.env())

    def snapshot(self) -> dict[str, bytes]:
        """Every file under the conf dir, run dir and log root, with its content."""
        out = {}
        for base in (self.conf_dir, self.host.run_dir, self.host.log_dir):
            if base.exists():
                out.update({str(p): p.read_bytes() if p.is_file() else b"<dir>" for p in base.rglob("*")})
                out[str(base)] = b"<dir>"
        return out


def wait_status(path: Path, predicate, timeout: float = 20.0, what: str = "status") -> dict[str, Any]:  # noqa: ANN001
    """Poll an instance's status file until ``predicate(status)`` holds."""
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError):
            st = {}
        if st and predicate(st):
            return st
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} in {path}: {st}")


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> Any:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def retained(port: int, topic: str) -> str:
    """The retained payload on ``topic`` (mosquitto_sub, 3 s at most)."""
    r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-C", "1", "-W", "3"],
                       capture_output=True, text=True, timeout=10)
    return r.stdout.strip()


@pytest.fixture
def site(tmp_path: Path, host: Any, broker: Any, sqlite_db: Any) -> Site:
    return Site(tmp_path / "site", host, broker, sqlite_db)


@pytest.fixture
def supervisord(site: Site):
    sv = Supervisord(site.root / "supervisord", site.conf_dir, site.host.env())
    yield sv
    sv.stop()
