"""The soak's faults: what each one does, when, and how long the tenants take to recover.

Recovered means, for every tenant the fault touched: `mqttd status --inventory --json` says
healthy, connected and database ok (for a killed daemon: a new pid; for a killed cluster node: a
connection made after the kill), and the tenant has stored a message published after the fault
ended (so it is storing new messages, not only old ones). The broker faults and the burst touch
the tenants on mosquitto, the cluster node kill the cluster tenant, the others every tenant.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lab.broker import wait_port

from .env import CLUSTER_ACK_WAIT_S, Stack
from .pub import SoakPublisher

KINDS = ("daemon_kill", "broker_restart", "broker_kill", "pg_terminate", "pg_restart", "burst", "cluster_node_kill")
# cluster_node_kill twice a cycle, five faults apart: a full run kills a node at least twice, and the
# node killed before has been back for five intervals when the next one dies (and each kill first
# checks that every node serves sessions).
DEFAULT_CYCLE = ("daemon_kill", "broker_restart", "cluster_node_kill", "pg_restart", "daemon_kill", "broker_kill",
                 "burst", "cluster_node_kill", "daemon_kill", "pg_terminate")
LABELS = {
    "daemon_kill": "tenant daemon SIGKILL (Supervisor restarts it)",
    "broker_restart": "broker SIGTERM + restart",
    "broker_kill": "broker SIGKILL + restart",
    "pg_terminate": "pg_terminate_backend on tenant connections",
    "pg_restart": "PostgreSQL restart (private cluster)",
    "burst": "publish burst",
    "cluster_node_kill": "NATS cluster: SIGKILL the node mqttd is on + restart",
}


@dataclass
class Fault:
    kind: str
    target: str | None                    # the tenant, for daemon_kill
    tenants: list[str]                    # the tenants it touches
    t_inject: float                       # wall clock
    t_end: float = 0.0                    # when the fault itself was over (broker back, burst done)
    s0: dict[str, int] = field(default_factory=dict)   # next 'soak' seq at t_end, per tenant
    t_recovered: float | None = None
    detail: str = ""
    old_pid: int | None = None
    node: str | None = None               # cluster_node_kill: "host:port" of the node killed
    aftermath: float = 0.0                # s after t_inject that are still the fault's, recovered or not
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def recovery_s(self) -> float | None:
        return None if self.t_recovered is None else self.t_recovered - self.t_inject

    def window(self, slack: float) -> tuple[float, float]:
        end = self.t_recovered if self.t_recovered is not None else self.t_end + 60.0
        return self.t_inject - slack, max(end, self.t_inject + self.aftermath) + slack


def schedule(kinds: list[str], tenants: list[str], start: float, interval: float,
             last: float) -> list[tuple[float, str, str | None]]:
    """(offset_s, kind, target) from ``start`` every ``interval`` up to ``last``, cycling through
    ``kinds``; daemon kills rotate over the tenants."""
    out, i, victims = [], 0, 0
    t = start
    while t <= last and kinds:
        kind = kinds[i % len(kinds)]
        target = None
        if kind == "daemon_kill":
            target = tenants[victims % len(tenants)]
            victims += 1
        out.append((t, kind, target))
        i += 1
        t += interval
    return out


class FaultRunner:
    def __init__(self, stack: Stack, pub: SoakPublisher, *, outage: float, burst_mult: float, burst_s: float,
                 recovery_timeout: float, log: Callable[[str], None]) -> None:
        self.stack, self.pub, self.log = stack, pub, log
        self.outage, self.burst_mult, self.burst_s = outage, burst_mult, burst_s
        self.recovery_timeout = recovery_timeout
        self.faults: list[Fault] = []
        self.anomalies: list[dict[str, Any]] = []
        self.pids: dict[str, int] = {}
        self._expected_restart: set[str] = set()
        self.watch()

    # ---- watching Supervisor for restarts nobody asked for ------------------------------------------
    def watch(self) -> None:
        try:
            infos = {i["name"]: i for i in self.stack.sv.all_info()}
        except Exception:  # noqa: BLE001 - supervisord busy; next tick
            return
        for t in self.stack.tenants:
            info = infos.get(self.stack.program(t))
            if info is None:
                continue
            state, pid = info["statename"], info["pid"]
            if state in ("FATAL", "BACKOFF", "EXITED") and t not in self._expected_restart and not any(
                    a["tenant"] == t and a["state"] == state for a in self.anomalies[-3:]):
                self._anomaly(t, f"Supervisor state {state}: {info['description']}", state=state)
            if pid and t in self.pids and pid != self.pids[t]:
                if t in self._expected_restart:
                    self._expected_restart.discard(t)
                else:
                    self._anomaly(t, f"restarted without being killed by the soak: pid {self.pids[t]} -> {pid}")
            if pid:
                self.pids[t] = pid

    def _anomaly(self, tenant: str, what: str, state: str = "") -> None:
        tail = _tail(self.stack.mqttd_log(tenant), 25)
        self.anomalies.append({"time": time.time(), "tenant": tenant, "what": what, "state": state,
                               "status": self.stack.status().get(tenant), "log_tail": tail})
        self.log(f"ANOMALY {tenant}: {what}")

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.watch()
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # ---- injecting ---------------------------------------------------------------------------------
    def inject(self, kind: str, target: str | None) -> Fault:
        st = self.stack
        if target:
            tenants = [target]
        elif kind in ("broker_restart", "broker_kill", "burst"):
            tenants = st.broker_tenants                # the tenants on mosquitto (burst: scripts/soak)
        elif kind == "cluster_node_kill":
            tenants = [st.cluster_tenant]
        else:
            tenants = list(st.tenants)
        f = Fault(kind, target, tenants, time.time())
        if kind == "daemon_kill":
            assert target
            self.watch()
            pid = st.sv.info(st.program(target))["pid"]
            f.old_pid = pid
            self._expected_restart.add(target)
            f.t_inject = time.time()
            os.kill(pid, signal.SIGKILL)          # a process our own supervisord started
            f.detail = f"pid {pid}"
        elif kind in ("broker_restart", "broker_kill"):
            sig = signal.SIGKILL if kind == "broker_kill" else signal.SIGTERM
            f.t_inject = time.time()
            st.broker.stop(sig)
            self.sleep(self.outage)
            st.broker.start()
            f.detail = f"down {time.time() - f.t_inject:.1f}s"
        elif kind == "cluster_node_kill":
            self._kill_cluster_node(f)
        elif kind == "pg_terminate":
            n = sum(st.dbs[t].terminate_backends() for t in tenants)
            f.detail = f"{n} backends terminated"
        elif kind == "pg_restart":
            if st.pg is None:
                raise RuntimeError("pg_restart needs a private cluster")
            st.pg.restart(self.outage)
            f.detail = f"down {time.time() - f.t_inject:.1f}s"
        elif kind == "burst":
            self.pub.burst(self.burst_mult, self.burst_s, tenants)
            before = {t: self.pub.streams[t].n for t in tenants}
            self.sleep(self.burst_s)
            sent = sum(self.pub.streams[t].n - before[t] for t in tenants) / len(tenants)
            f.detail = (f"{self.burst_mult:g}x for {self.burst_s:g}s: {sent / self.burst_s:.0f} msg/s per tenant "
                        f"achieved (sustained {self.pub.rates[tenants[0]]:g})")
        else:
            raise ValueError(kind)
        f.t_end = time.time()
        f.s0 = {t: self.pub.streams[t].sent_seq()["soak"] for t in tenants}
        self.faults.append(f)
        return f

    def _kill_cluster_node(self, f: Fault) -> None:
        """SIGKILL the NATS node the cluster tenant is connected to (`broker` in its status), keep
        it down --outage s, start it again on the same ports and data dir."""
        st = self.stack
        cluster, tenant = st.cluster, st.cluster_tenant
        # Only from a whole cluster: every node grants a persistent session's SUBSCRIBE, so the
        # node restarted by the last kill has rejoined and the kill costs one replica, not quorum.
        cluster.warm_up(timeout=60)
        deadline = time.monotonic() + 30
        while not ((row := st.status_file(tenant)).get("connected") and row.get("broker") in cluster.hosts()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster tenant not connected to a node: {row}")
            self.sleep(0.25)
        f.node = row["broker"]
        i = cluster.hosts().index(f.node)
        f.t_inject = time.time()
        f.aftermath = CLUSTER_ACK_WAIT_S + self.outage + 5.0   # the redeliveries of what the dead node saw unacked
        cluster.kill_node(i)
        self.sleep(self.outage)
        cluster.start_node(i)
        wait_port(cluster.mqtt_ports[i], timeout=60)
        f.detail = f"node n{i} {f.node} down {time.time() - f.t_inject:.1f}s"

    # ---- recovery ----------------------------------------------------------------------------------
    def _stored_past(self, f: Fault) -> bool:
        for t in f.tenants:
            try:
                top = self.stack.dbs[t].scalar("select max(seq) from sensors_reading where source = 'soak'")
            except Exception:  # noqa: BLE001 - PostgreSQL may be on its way back
                return False
            if top is None or top < f.s0[t]:
                return False
        return True

    def _healthy(self, f: Fault, rows: dict[str, dict[str, Any]]) -> bool:
        for t in f.tenants:
            r = rows.get(t)
            if not r or not (r.get("healthy") and r.get("connected") and r.get("db_ok") is not False):
                return False
            if f.kind == "daemon_kill" and r.get("pid") in (None, f.old_pid):
                return False
            if f.kind == "cluster_node_kill" and (self.stack.status_file(t).get("last_connected_at") or 0) < f.t_inject:
                return False                              # not yet reconnected (to another node)
        return True

    def wait_recovered(self, f: Fault) -> bool:
        deadline = time.monotonic() + self.recovery_timeout
        rows: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            self.watch()
            if self._stored_past(f):
                rows = self.stack.status()
                if self._healthy(f, rows):
                    f.t_recovered = time.time()
                    if f.kind == "cluster_node_kill":
                        f.detail += f"; mqttd now on {self.stack.status_file(f.tenants[0]).get('broker')}"
                    return True
            time.sleep(0.25)
        f.diagnostics = {"status": rows or self.stack.status(),
                         "log_tail": {t: _tail(self.stack.mqttd_log(t), 40) for t in f.tenants}}
        self.log(f"FAULT NOT RECOVERED within {self.recovery_timeout:g}s: {f.kind} {f.target or ''}")
        return False


def _tail(path: os.PathLike, lines: int) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 200 * lines))
            return fh.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []
