"""A private RabbitMQ node with rabbitmq_mqtt (MQTT 3.1.1 on 3.10) for one test: its own node name,
AMQP/dist/epmd/MQTT ports, mnesia, log and home dirs and enabled-plugins file, so the machine's own
RabbitMQ is never touched. Stopped with ``rabbitmqctl -n NODE stop``, then by the PID we started."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from lab.broker import free_port, wait_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


class RabbitBroker:
    def __init__(self, workdir: Path, prefetch: int | None = None) -> None:
        if not os.path.exists(SERVER) or not shutil.which("erl"):
            raise RuntimeError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.amqp_port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.node = f"mqttdtest{self.port}@localhost"
        self.prefetch = prefetch
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        d = self.dir
        return {**os.environ, "HOME": str(d / "home"), "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.amqp_port),
                "RABBITMQ_DIST_PORT": str(self.dist_port), "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1", "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"), "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(d / "rabbit.pid")}

    def start(self, timeout: float = 90) -> RabbitBroker:
        d = self.dir
        for sub in ("home", "mnesia", "log"):
            (d / sub).mkdir(exist_ok=True)
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        conf = [f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}", "mqtt.allow_anonymous = true",
                "loopback_users = none"]
        if self.prefetch is not None:
            conf.append(f"mqtt.prefetch = {self.prefetch}")
        (d / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        self.proc = subprocess.Popen([SERVER], env=self.env(), stdout=open(d / "server.out", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)   # its own process group
        try:
            wait_port(self.port, timeout=timeout)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            subprocess.run([CTL, "-n", self.node, "stop"], env=self.env(), capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)     # the session we started with setsid
            except OSError:
                pass
            self.proc.wait(10)
        # the private epmd this node started on its own port (never the machine's, on 4369)
        # (refused while the node is still registered: a few tries, then it is gone)
        for _ in range(5):
            r = subprocess.run(["epmd", "-names"], env=self.env(), capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                break                                   # no epmd on our port any more
            subprocess.run(["epmd", "-kill"], env=self.env(), capture_output=True, timeout=10)
            time.sleep(1.0)
        self.proc = None
