"""A private mosquitto for one test: its own port, config and persistence dir, so a test can
stop, SIGKILL and restart it on the same port and data without touching the machine's broker."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_process(proc: subprocess.Popen, sig: int, grace: float, group: bool = False) -> None:
    """Send ``sig`` to a process we started (its process group with ``group``), wait ``grace``
    seconds, then SIGKILL it: a broker that ignores SIGTERM must not hang a test."""
    send = os.killpg if group else os.kill
    send(proc.pid, sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        send(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_port(port: int, timeout: float = 10.0, up: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not come {'up' if up else 'down'} within {timeout}s")


class Broker:
    def __init__(self, workdir: Path, port: int | None = None, persistence: bool = True,
                 autosave_interval: int = 1, extra: str = "") -> None:
        if not shutil.which("mosquitto"):
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"

    @property
    def conf_path(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "mosquitto.log"

    def write_conf(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            f"autosave_interval {self.autosave_interval}",
            "max_queued_messages 1000000",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice",
            "connection_messages true",
            # As root, mosquitto 2.0 switches to the 'mosquitto' user, which cannot write this
            # test's persistence dir: every SIGKILL would then lose the whole session.
            "user root" if os.geteuid() == 0 else "",
            self.extra,
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self) -> Broker:
        self.write_conf()
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf_path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the broker we started (by PID). SIGTERM saves persistence; SIGKILL does not."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout)
        self.proc = None
        wait_port(self.port, up=False)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def wipe(self) -> None:
        """Forget every session (broker must be stopped): a restart without persistence."""
        for f in self.dir.glob("mosquitto.db*"):
            f.unlink()

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""
