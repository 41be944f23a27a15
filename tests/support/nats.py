"""A private NATS server with its MQTT gateway (MQTT 3.1.1, JetStream for sessions) for one test:
its own ports, config and store dir. NATS accepts ``$share/GROUP/filter`` as an ordinary filter
that no topic matches: the broker on which shared subscriptions would silently eat messages."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from lab.broker import free_port, wait_port


class NatsBroker:
    def __init__(self, workdir: Path, ack_wait: str | None = None) -> None:
        if not shutil.which("nats-server"):
            raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.client_port = free_port()
        # mqtt { ack_wait }: how long an un-acked delivery waits before NATS sends it again
        # (30 s by default): after a consumer's crash its in-flight messages come back only then
        self.ack_wait = ack_wait
        self.proc: subprocess.Popen | None = None

    def start(self) -> NatsBroker:
        conf = self.dir / "nats.conf"
        conf.write_text(
            f'server_name: "mqttd-test-{self.port}"\nlisten: "127.0.0.1:{self.client_port}"\n'
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}\nmqtt {{ listen: "127.0.0.1:{self.port}"'
            + (f', ack_wait: "{self.ack_wait}"' if self.ack_wait else "") + " }\n")
        self.proc = subprocess.Popen(["nats-server", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "nats.log", "ab"), start_new_session=True)
        try:
            wait_port(self.port, timeout=20)
        except TimeoutError:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"nats-server did not start: {(self.dir / 'nats.log').read_text()[-800:]}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None
        wait_port(self.port, up=False)
