"""A private aedes 1.x broker (Node.js) for one test (tests/support/aedes_broker.mjs), with the npm
modules from the project's ``.node/`` that ``scripts/setup`` installs from
tests/support/node-brokers.json. MQTT 3.1.1 only.

Its session store is aedes-persistence-redis on a private ``redis-server`` (its own port and
dir, append-only file fsynced every write): the store that kept sessions through a broker restart
and lost nothing here. ``persistence="level"`` (LevelDB) dropped a few QoS 1 messages to a
connected subscriber (docs/brokers.md); ``"memory"`` forgets every session on a restart."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from lab.broker import end_process, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / ".node"
SCRIPT = Path(__file__).with_name("aedes_broker.mjs")


def available() -> str | None:
    """None when aedes can be started here, else why not."""
    if not shutil.which("node"):
        return "node is not installed (apt-get install nodejs)"
    if not (NODE_DIR / "node_modules" / "aedes" / "package.json").exists():
        return "aedes is not installed in .node/ (run scripts/setup)"
    if not shutil.which("redis-server"):
        return "redis-server is not installed (apt-get install redis-server)"
    return None


class AedesBroker:
    def __init__(self, workdir: Path, persistence: str = "redis") -> None:
        why = available()
        if why:
            raise RuntimeError(why)
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persistence = persistence
        self.redis_port = free_port()
        self.redis: subprocess.Popen | None = None
        self.proc: subprocess.Popen | None = None

    def _start_redis(self) -> None:
        rdir = self.dir / "redis"
        rdir.mkdir(exist_ok=True)
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(rdir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
            stdout=open(rdir / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.redis_port, timeout=10)

    def start(self) -> AedesBroker:
        mode = self.persistence
        if mode == "redis":
            if self.redis is None:
                self._start_redis()          # the store outlives broker restarts, like a separate service
            mode = f"redis:{self.redis_port}"
        self.proc = subprocess.Popen(["node", str(SCRIPT), str(self.port), str(self.dir)],
                                     env={**os.environ, "MQTTD_NODE_DIR": str(NODE_DIR), "AEDES_PERSISTENCE": mode},
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "aedes.log", "ab"),
                                     start_new_session=True)
        try:
            wait_port(self.port, timeout=20)
        except TimeoutError:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"aedes did not start: {(self.dir / 'aedes.log').read_text()[-1500:]}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM closes the LevelDB store cleanly; SIGKILL is a crash."""
        if self.proc and self.proc.poll() is None:
            end_process(self.proc, sig, 15)
        self.proc = None
        wait_port(self.port, up=False)

    def close(self) -> None:
        """Stop the broker and its private Redis."""
        self.stop()
        if self.redis and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(10)
        self.redis = None
