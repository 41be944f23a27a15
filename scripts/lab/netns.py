"""Several hosts on one machine (issue 15.6): a network namespace per host, joined to the root
namespace (where the test's private broker listens) by a veth link of its own, and a UTS
namespace per daemon so that each host has its own host name, hence its own client id
(NAME-HOSTNAME). Needs root and iproute2; packet loss needs nftables (``nft``).

This kernel has no ``sch_netem`` (``tc qdisc ... netem``: "Specified qdisc kind is unknown"), so:
- loss is real packet loss on the host's link: an nftables rule in the host's namespace drops a
  random 1 % of packets both ways (``numgen random mod 100 < 1``);
- latency is a userspace delay line (:class:`DelayProxy`) in front of the broker on the host's
  link address: every chunk of bytes is held ``delay`` seconds each way, order kept.
Everything created here is removed by :meth:`Net.cleanup`, also after a failed test."""
from __future__ import annotations

import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from .daemon import Daemon, Host


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    r = subprocess.run(["ip", "netns", "add", f"mqttdprobe{os.getpid()}"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"mqttdprobe{os.getpid()}"], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class NetHost:
    """One host: namespace ``ns``, address ``addr``; the root side of its link is ``gw``."""

    def __init__(self, net: Net, index: int) -> None:
        self.index = index
        tag = f"{os.getpid() % 10000}x{index}"
        self.ns, self.link = f"mqttdB{tag}", f"vB{tag}"        # link names: at most 15 characters
        self.subnet = f"10.{200 + index}.{os.getpid() % 250}"
        self.gw, self.addr = f"{self.subnet}.1", f"{self.subnet}.2"
        self.hostname = f"site{index}"
        self.host = Host(net.root / self.hostname)

    def create(self) -> None:
        _ip("ip", "netns", "add", self.ns)
        _ip("ip", "link", "add", self.link, "type", "veth", "peer", "name", self.link + "p")
        _ip("ip", "link", "set", self.link + "p", "netns", self.ns)
        _ip("ip", "addr", "add", f"{self.gw}/24", "dev", self.link)
        _ip("ip", "link", "set", self.link, "up")
        _ip("ip", "addr", "add", f"{self.addr}/24", "dev", self.link + "p", ns=self.ns)
        _ip("ip", "link", "set", self.link + "p", "up", ns=self.ns)
        _ip("ip", "link", "set", "lo", "up", ns=self.ns)

    def cut(self) -> None:
        """Pull the cable: the root side of the link goes down (packets vanish, no RST)."""
        _ip("ip", "link", "set", self.link, "down")

    def restore(self) -> None:
        _ip("ip", "link", "set", self.link, "up")

    def lose(self, percent: int) -> None:
        """Drop ``percent`` % of the packets in and out of this host, at random (nftables)."""
        rules = "table inet mqttdloss {\n" + "".join(
            f"  chain {hook} {{\n    type filter hook {hook} priority 0;\n"
            f"    numgen random mod 100 < {percent} counter drop\n  }}\n"
            for hook in ("input", "output")) + "}\n"
        r = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=rules, capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nft: {r.stderr.strip()}")

    def dropped(self) -> int:
        """Packets the loss rules dropped so far (both ways)."""
        r = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "list", "table", "inet", "mqttdloss"],
                           capture_output=True, text=True)
        return sum(int(w) for w in re.findall(r"counter packets (\d+)", r.stdout))

    def start(self, project: str, config: Path, db_env: dict[str, str]) -> Daemon:
        """mqttd in this host's namespace, under its own host name (UTS namespace)."""
        env = self.host.env(**db_env)
        cmd = ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c",
               f'hostname {self.hostname} && exec "$@"', "sh",
               sys.executable, "-m", "mqttd", "run", "--project", project, "--config", str(config)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.host.procs.append(proc)
        return Daemon(self.host, project, proc, ())

    def destroy(self) -> None:
        self.host.reap()
        subprocess.run(["ip", "link", "del", self.link], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


class Net:
    """The hosts of one test; a context manager that always cleans up."""

    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        self.hosts = [NetHost(self, i) for i in range(count)]
        self.proxies: list[DelayProxy] = []

    def __enter__(self) -> Net:
        try:
            for h in self.hosts:
                h.create()
        except Exception:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        for p in self.proxies:
            p.stop()
        for h in self.hosts:
            h.destroy()


class DelayProxy:
    """A TCP delay line: listens on (addr, port), forwards to (target_host, target_port), holding
    every chunk ``delay`` seconds in each direction (so a round trip gains 2 × delay)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
        self.delay = delay
        self.target = target
        self.sock = socket.create_server(listen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Read from src as fast as it comes; write each chunk to dst ``delay`` after it came."""
        line: deque[tuple[float, bytes]] = deque()
        cond = threading.Condition()
        done = [False]

        def writer() -> None:
            while True:
                with cond:
                    while not line and not done[0]:
                        cond.wait()
                    if not line:
                        break
                    due, chunk = line.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(chunk)
                except OSError:
                    break
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        w = threading.Thread(target=writer, daemon=True)
        w.start()
        sel = selectors.DefaultSelector()
        sel.register(src, selectors.EVENT_READ)
        while not self._stop.is_set():
            if not sel.select(0.2):
                continue
            try:
                chunk = src.recv(65536)
            except OSError:
                chunk = b""
            with cond:
                if chunk:
                    line.append((time.monotonic() + self.delay, chunk))
                else:
                    done[0] = True
                cond.notify()
            if not chunk:
                break
        with cond:
            done[0] = True
            cond.notify()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
