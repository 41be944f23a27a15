"""The soak's world: a private mosquitto, one PostgreSQL database per tenant (on a private cluster
when the harness can own one, else on the machine's server), optionally a private 3-node NATS
cluster for one more tenant (lab/clusters.py), a real supervisord, and the tenants deployed into
it with the real `mqttd deploy --apply`. Everything here is started by the soak and is stopped by
PID (or by its own pg_ctl data dir) in ``Stack.close``; the databases are dropped.
"""
from __future__ import annotations

import getpass
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lab import db as dbmod
from lab.broker import Broker, free_port
from lab.clusters import NatsCluster
from lab.daemon import write_config
from lab.db import TENANT_DIR, TenantDB
from lab.supervisor import VENV, Supervisord, write_inventory

# mqtt { ack_wait } of the soak's NATS cluster: NATS's default, what a deployment runs with (the
# failover tests use 3 s to be quick). A delivery the killed node had in flight, or whose PUBACK
# died with it, comes back only this long after; so long is a node kill's aftermath (faults.py).
CLUSTER_ACK_WAIT_S = 30.0


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port, so the soak may restart it. Never the
    machine's own service. As root, initdb and postgres run as the ``postgres`` user."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="mqttd-soak-pg-", dir="/tmp"))
        self.data = self.base / "data"
        self.log_path = self.base / "postgres.log"

    @staticmethod
    def possible() -> str | None:
        """None if a private cluster can be made here, else the reason it cannot."""
        for tool in ("initdb", "pg_ctl"):
            if not shutil.which(tool):
                return f"{tool} not found"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no 'postgres' user to run initdb as"
            if not shutil.which("runuser"):
                return "running as root without runuser"
        return None

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)

    def _pg_ctl(self, *args: str, timeout: float = 60.0) -> None:
        subprocess.run(self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", *args),
                       check=True, capture_output=True, timeout=timeout)

    def start(self) -> PrivatePostgres:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        subprocess.run(self._cmd("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                                 "--no-sync"), check=True, capture_output=True, timeout=120)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.base}'\nmax_connections = 60\n")
        self._pg_ctl("start")
        return self

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def restart(self, outage: float) -> None:
        """A clean restart with ``outage`` seconds of connection refused in between."""
        self.stop()
        time.sleep(outage)
        self._pg_ctl("start")

    def destroy(self) -> None:
        try:
            self._pg_ctl("-m", "fast", "stop", timeout=30)
        except Exception:  # noqa: BLE001 - already stopped, or stuck: kill the postmaster we started
            try:
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass
        shutil.rmtree(self.base, ignore_errors=True)


class Stack:
    """Broker + databases + supervisord + deployed tenants. ``close()`` undoes all of it."""

    def __init__(self, workdir: Path, tenants: list[str], *, pg_mode: str, autosave: int, max_queued: int,
                 cluster_tenant: str | None = None, log=print) -> None:  # noqa: ANN001
        self.dir, self.log = workdir, log
        self.tenants = tenants + ([cluster_tenant] if cluster_tenant else [])
        self.broker_tenants = list(tenants)            # on mosquitto
        self.cluster_tenant = cluster_tenant           # on the NATS cluster, if any
        self.cluster: NatsCluster | None = None
        self.pg_mode, self.autosave, self.max_queued = pg_mode, autosave, max_queued
        self.pg: PrivatePostgres | None = None
        self.pg_note = ""
        self.broker: Broker | None = None
        self.dbs: dict[str, TenantDB] = {}
        self.created: list[TenantDB] = []        # every database made, for teardown even if setup fails
        self.sv: Supervisord | None = None
        self.run_dir, self.log_dir = workdir / "run", workdir / "log"
        self.conf_dir = workdir / "conf.d"
        self.inventory = workdir / "inventory.toml"

    # ---- start -------------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTTD_", "SUPERVISOR_"))}
        env.update(MQTTD_RUN_DIR=str(self.run_dir), MQTTD_LOG_DIR=str(self.log_dir), PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def start(self) -> None:
        self._start_postgres()
        self.broker = Broker(self.dir / "broker", autosave_interval=self.autosave,
                             extra=f"max_queued_messages {self.max_queued}").start()
        self.log(f"broker: mosquitto on 127.0.0.1:{self.broker.port}, persistence on, autosave "
                 f"{self.autosave}s, max_queued_messages {self.max_queued}, max_inflight_messages default (20)")
        with ThreadPoolExecutor(len(self.tenants) + 1) as ex:
            # the cluster's nodes elect their JetStream leaders while the databases are migrated
            cluster = ex.submit(self._start_cluster) if self.cluster_tenant else None
            for name, db in zip(self.tenants, ex.map(lambda _t: self._make_db(), self.tenants)):
                self.dbs[name] = db
            if cluster:
                cluster.result()
        self.log("databases: " + ", ".join(f"{t}={d.name}" for t, d in self.dbs.items()))
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.sv = Supervisord(self.dir / "supervisord", self.conf_dir, self.env()).start()
        self._deploy()

    def _start_postgres(self) -> None:
        why = PrivatePostgres.possible() if self.pg_mode in ("auto", "private") else "--pg shared"
        if why is None:
            self.pg = PrivatePostgres().start()
            # TenantDB reads these at import (lab.db.PG) and the tenants read them from env.
            dbmod.PG.update(host="127.0.0.1", port=self.pg.port, user="postgres")
            os.environ.update(TENANT_DB_HOST="127.0.0.1", TENANT_DB_PORT=str(self.pg.port), TENANT_DB_USER="postgres")
            self.log(f"postgres: private cluster on 127.0.0.1:{self.pg.port} ({self.pg.base})")
            return
        if self.pg_mode == "private":
            raise RuntimeError(f"--pg private: cannot own a private PostgreSQL cluster: {why}")
        self.pg_note = f"PostgreSQL restart skipped: no private cluster ({why}); the shared server is never restarted"
        self.log(f"postgres: shared server {dbmod.PG['host']}:{dbmod.PG['port']} ({self.pg_note})")

    def _start_cluster(self) -> None:
        # stream and consumer replicas 3: the session outlives the node it was on (docs/brokers.md)
        self.cluster = NatsCluster(self.dir / "cluster", ack_wait=f"{CLUSTER_ACK_WAIT_S:g}s")
        self.cluster.start()
        self.log(f"cluster: 3 NATS nodes (JetStream, MQTT, stream/consumer replicas 3), MQTT on "
                 f"{', '.join(self.cluster.hosts())}, for tenant {self.cluster_tenant}")

    def endpoints(self) -> dict[str, list[tuple[str, int]]]:
        """The broker node(s) each tenant's publisher may use."""
        out = {t: [("127.0.0.1", self.broker.port)] for t in self.broker_tenants}
        if self.cluster_tenant and self.cluster:
            out[self.cluster_tenant] = [("127.0.0.1", p) for p in self.cluster.mqtt_ports]
        return out

    def _make_db(self) -> TenantDB:
        db = TenantDB.postgres()
        self.created.append(db)
        db.migrate()
        return db

    def _deploy(self) -> None:
        assert self.broker and self.sv
        projects = []
        for t in self.tenants:
            if t == self.cluster_tenant:
                config = self._cluster_config(self.dir / f"{t}.toml")
            else:
                config = write_config(self.dir / f"{t}.toml", self.broker.port, keepalive=10)
            env = {**self.dbs[t].env, "TENANT_SOAK_PREFIX": t, "TENANT_DB_HOST": str(dbmod.PG["host"]),
                   "TENANT_DB_PORT": str(dbmod.PG["port"]), "TENANT_DB_USER": str(dbmod.PG["user"])}
            projects.append({"name": t, "config": str(config), "environment": env})
        write_inventory(self.inventory, projects, user=getpass.getuser(), venv=str(VENV), directory=str(TENANT_DIR),
                        log_dir=str(self.log_dir), run_dir=str(self.run_dir))
        r = self.mqttd("deploy", "--inventory", str(self.inventory), "--conf-dir", str(self.conf_dir),
                       "--apply", "--supervisor-url", self.sv.url)
        if r.returncode != 0:
            raise RuntimeError(f"mqttd deploy --apply failed ({r.returncode}): {r.stderr.strip()}")
        self.log("deploy: " + " | ".join(line.strip() for line in r.stdout.splitlines() if "supervisord:" in line))
        for t in self.tenants:
            self.sv.wait_state(self.program(t), "RUNNING", timeout=60)

    def _cluster_config(self, path: Path) -> Path:
        """The lab config with `hosts` = every node instead of `host`/`port` (they exclude each
        other), as tests/test_cluster.py writes it; MQTT 3.1.1, all NATS speaks."""
        assert self.cluster
        config = write_config(path, 1, protocol="3.1.1", keepalive=10)
        text = config.read_text()
        one = 'host = "127.0.0.1"\nport = 1\n'
        assert one in text, text
        config.write_text(text.replace(one, "hosts = [" + ", ".join(f'"{h}"' for h in self.cluster.hosts()) + "]\n"))
        return config

    # ---- use ---------------------------------------------------------------------------------------
    @staticmethod
    def program(tenant: str) -> str:
        return f"{tenant}-mqtt"

    def mqttd(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mqttd", *args], env=self.env(), capture_output=True,
                              text=True, timeout=timeout)

    def status(self) -> dict[str, dict[str, Any]]:
        """`mqttd status --inventory ... --json`, by project name ({} if it could not run)."""
        try:
            r = self.mqttd("status", "--inventory", str(self.inventory), "--json", timeout=30)
            return {row["name"]: row for row in json.loads(r.stdout)}
        except (subprocess.SubprocessError, ValueError, KeyError, TypeError):
            return {}

    def status_file(self, tenant: str) -> dict[str, Any]:
        """The tenant's own status file (RUN_DIR/NAME.status.json): all its keys, among them
        `broker` ("host:port" of the node in use) and `last_connected_at`, which the
        `status --inventory --json` row leaves out. {} if it cannot be read."""
        try:
            return json.loads((self.run_dir / f"{tenant}.status.json").read_text())
        except (OSError, ValueError):
            return {}

    def mqttd_log(self, tenant: str) -> Path:
        return self.log_dir / tenant / "mqttd.log"

    def all_ready(self, timeout: float = 60.0) -> None:
        """Every tenant healthy, connected and subscribed (canary round trip done)."""
        deadline = time.monotonic() + timeout
        rows: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            rows = self.status()
            if rows and all(rows.get(t, {}).get("healthy") and rows[t].get("connected")
                            and rows[t].get("canary_age_s") is not None for t in self.tenants):
                return
            time.sleep(0.5)
        raise RuntimeError(f"tenants not healthy within {timeout}s: {json.dumps(rows, indent=1)}")

    # ---- stop --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop and reap everything we started; drop every database we created."""
        steps = [("supervisord", lambda: self.sv and self.sv.stop()),
                 ("broker", lambda: self.broker and self.broker.proc and self.broker.stop()),
                 ("cluster", lambda: self.cluster and self.cluster.stop())]
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - go on tearing down the rest
                self.log(f"teardown: {what}: {exc}")
                if what == "broker" and self.broker and self.broker.proc:
                    self.broker.proc.kill()
                    self.broker.proc.wait(10)
        for db in self.created:
            try:
                db.drop()
            except Exception as exc:  # noqa: BLE001
                self.log(f"teardown: DROP DATABASE {db.name} failed: {exc}")
        if self.pg:
            self.pg.destroy()
