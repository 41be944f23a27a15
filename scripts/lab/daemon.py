"""Run the real `mqttd` CLI as a subprocess with its own run and log dirs, and always reap it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .db import TENANT_DIR, TenantDB


def write_config(path: Path, port: int, *, protocol: str = "5", keepalive: int = 10,
                 extra: str = "", broker_extra: str = "", settings: str = "tenant_site.settings",
                 canary_interval: float = 1, tenant_dir: Path = TENANT_DIR) -> Path:
    """``tenant_dir``: the sample tenant on the daemon's path (scripts/bench --baseline: an older
    commit's own tenant for that commit's code)."""
    path.write_text(
        f'[django]\nsettings = "{settings}"\npythonpath = ["{tenant_dir}"]\n\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\nprotocol = "{protocol}"\nkeepalive = {keepalive}\n'
        f"reconnect_min = 0.2\nreconnect_max = 2\n{broker_extra}\n\n"
        f"[status]\ninterval = 0.5\ncanary_interval = {canary_interval}\n\n{extra}\n"
    )
    return path


class Host:
    """One simulated host: a run dir and a log root shared by its projects."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_dir = root / "run"
        self.log_dir = root / "log"
        self.procs: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTTD_", "SUPERVISOR_"))}
        env.update(MQTTD_RUN_DIR=str(self.run_dir), MQTTD_LOG_DIR=str(self.log_dir), PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def mqttd(self, *args: str, db: TenantDB | None = None, env: dict[str, str] | None = None,
              timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a short mqttd command to completion."""
        e = self.env(**(db.env if db else {}), **(env or {}))
        return subprocess.run([sys.executable, "-m", "mqttd", *args], env=e, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, project: str, config: Path, db: TenantDB | None = None, *args: str,
              env: dict[str, str] | None = None) -> Daemon:
        e = self.env(**(db.env if db else {}), **(env or {}))
        proc = subprocess.Popen([sys.executable, "-m", "mqttd", "run", "--project", project, "--config", str(config),
                                 *args], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return Daemon(self, project, proc, args)

    def reap(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except Exception:  # noqa: BLE001
                pass


class Daemon:
    def __init__(self, host: Host, project: str, proc: subprocess.Popen, args: tuple[str, ...]) -> None:
        self.host, self.project, self.proc = host, project, proc
        self.name = project
        for i, a in enumerate(args):
            if a == "--instance":
                self.name = f"{project}-{args[i + 1]}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def status_path(self) -> Path:
        return self.host.run_dir / f"{self.name}.status.json"

    @property
    def log_path(self) -> Path:
        return self.host.log_dir / self.name / "mqttd.log"

    def status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st.get("pid") == self.pid and predicate(st):
                return st
            if self.proc.poll() is not None:
                raise AssertionError(f"mqttd {self.name} exited {self.proc.returncode} while waiting for {what}: "
                                     f"{self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; status: {self.status()}\nlog:\n{self.log()[-3000:]}")

    def wait_connected(self, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_for(lambda s: s.get("connected") and s.get("state") == "running", timeout, "connected")

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""
