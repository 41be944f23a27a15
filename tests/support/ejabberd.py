"""A private ejabberd 23.01 (Debian) with mod_mqtt for one test: its own config, node name,
spool (mnesia) and log dirs, run as the current user straight through ``erl`` (ejabberdctl would
switch to the ``ejabberd`` user, which cannot write a test's dirs). Erlang distribution listens
on a free port of its own with ``-start_epmd false``, so no epmd is started or shared with the
machine. mod_mqtt keeps its defaults on purpose: it grants ``SessionExpiryInterval: 300`` and
``ServerKeepAlive`` whatever the client asks, the broker's own grants that mqttd must honour;
``queue_type: file`` keeps an offline session's queue on disk through a broker restart."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from lab.broker import end_process, free_port, wait_port

LIBS = "/usr/lib/x86_64-linux-gnu"


def available() -> str | None:
    """None when a private ejabberd can be started here, else why not."""
    if not shutil.which("erl"):
        return "erl is not installed"
    if not any(Path(LIBS).glob("ejabberd-*/ebin/mod_mqtt.beam")):
        return "ejabberd is not installed (apt-get install ejabberd)"
    return None


class EjabberdBroker:
    def __init__(self, workdir: Path) -> None:
        why = available()
        if why:
            raise RuntimeError(why)
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"mqttdtest{self.port}@localhost"
        self.proc: subprocess.Popen | None = None

    def write_conf(self) -> Path:
        conf = self.dir / "ejabberd.yml"
        conf.write_text(
            'hosts: ["localhost"]\nloglevel: info\n'
            "auth_method: [anonymous]\nanonymous_protocol: login_anon\n"
            "allow_multiple_connections: true\n"
            f"listen:\n  - port: {self.port}\n    ip: \"127.0.0.1\"\n    module: mod_mqtt\n"
            "modules:\n  mod_mqtt:\n    queue_type: file\n")
        return conf

    def start(self) -> EjabberdBroker:
        d = self.dir
        (d / "spool").mkdir(exist_ok=True)
        (d / "log").mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(d), "EJABBERD_CONFIG_PATH": str(self.write_conf()),
               "EJABBERD_LOG_PATH": str(d / "log" / "ejabberd.log"), "ERL_LIBS": LIBS,
               "ERL_CRASH_DUMP": str(d / "log" / "erl_crash.dump"), "ERL_CRASH_DUMP_BYTES": "0"}
        cmd = ["erl", "-sname", self.node, "-noinput", "-setcookie", f"mqttdtest{self.port}",
               "-erl_epmd_port", str(self.dist_port), "-start_epmd", "false",
               "-kernel", "inet_dist_use_interface", "{127,0,0,1}",
               "-mnesia", "dir", f'"{d / "spool"}"', "-s", "ejabberd"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(d / "erl.out", "wb"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                wait_port(self.port, timeout=0.5)
                return self
            except TimeoutError:
                pass
            # a bad config leaves the VM running without ejabberd: give up at once, with the reason
            if "[critical]" in self.log() or time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"ejabberd did not start: {self.log()[-1500:]}") from None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: the Erlang VM shuts ejabberd down in order (mnesia flushed); SIGKILL: a crash."""
        if self.proc and self.proc.poll() is None:
            end_process(self.proc, sig, 30, group=True)
        self.proc = None
        wait_port(self.port, up=False)

    def log(self) -> str:
        out = []
        for p in (self.dir / "erl.out", self.dir / "log" / "ejabberd.log"):
            try:
                out.append(p.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)
