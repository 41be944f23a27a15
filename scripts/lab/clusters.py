"""Private broker clusters for the failover tests (issue 15.5, tests/test_cluster.py) and the
soak's cluster tenant (scripts/soak): three nodes on free loopback ports, each with its own data
dir, routes between them, started and killed by PID.

NATS: every node has JetStream and the MQTT gateway; the MQTT session streams and consumers
are replicated on all three nodes (``stream_replicas``/``consumer_replicas`` = 3) so that a
session outlives the node its client was on, once JetStream has elected new leaders."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from lab.broker import free_port, wait_port


class NatsCluster:
    def __init__(self, workdir: Path, size: int = 3, replicas: int = 3, ack_wait: str = "3s") -> None:
        if not shutil.which("nats-server"):
            raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
        self.dir = workdir
        self.size, self.replicas, self.ack_wait = size, replicas, ack_wait
        self.mqtt_ports = [free_port() for _ in range(size)]
        self.client_ports = [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen | None] = [None] * size

    def hosts(self) -> list[str]:
        """The ``broker.hosts`` list of the cluster's MQTT endpoints."""
        return [f"127.0.0.1:{p}" for p in self.mqtt_ports]

    def _conf(self, i: int) -> Path:
        d = self.dir / f"n{i}"
        d.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for j, p in enumerate(self.route_ports) if j != i)
        conf = d / "nats.conf"
        conf.write_text(
            f'server_name: "n{i}"\nlisten: "127.0.0.1:{self.client_ports[i]}"\n'
            f'jetstream {{ store_dir: "{d / "js"}" }}\n'
            f'cluster {{ name: "mqttd-test", listen: "127.0.0.1:{self.route_ports[i]}", routes: [{routes}] }}\n'
            f'mqtt {{ listen: "127.0.0.1:{self.mqtt_ports[i]}", ack_wait: "{self.ack_wait}", '
            f"stream_replicas: {self.replicas}, consumer_replicas: {self.replicas} }}\n")
        return conf

    def start_node(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(["nats-server", "-c", str(self._conf(i))], stdout=subprocess.DEVNULL,
                                         stderr=open(self.dir / f"n{i}" / "nats.log", "ab"), start_new_session=True)

    def start(self, timeout: float = 60) -> NatsCluster:
        for i in range(self.size):
            self.start_node(i)
        try:
            for p in self.mqtt_ports:
                wait_port(p, timeout=timeout)
            self.warm_up(timeout)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"the NATS cluster did not start ({exc}): {self.log(0)[-1500:]}") from None
        return self

    def warm_up(self, timeout: float) -> None:
        """Wait until every node serves a persistent MQTT session (CONNACK and a granted SUBACK):
        the listening port comes well before JetStream has elected its leaders, and a SUBSCRIBE
        in that window is refused ("timeout for request type CC ..." in the node's log)."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        deadline = time.monotonic() + timeout
        for i, port in enumerate(self.mqtt_ports):
            while True:
                c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"warmup-{i}", clean_session=True,
                                protocol=paho.MQTTv311)
                granted: list[bool] = []
                c.on_subscribe = lambda cl, u, mid, rcs, p, g=granted: g.append(not rcs[0].is_failure)
                try:
                    c.connect("127.0.0.1", port, 10)
                    c.loop_start()
                    c.subscribe("mqttd/warmup", 1)
                    end = time.monotonic() + 10
                    while not granted and time.monotonic() < end:
                        time.sleep(0.05)
                except OSError:
                    pass
                finally:
                    c.disconnect()
                    c.loop_stop()
                if granted and granted[0]:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node n{i} did not grant a subscription within {timeout:.0f} s")
                time.sleep(0.5)

    def kill_node(self, i: int) -> None:
        p = self.procs[i]
        if p and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
        self.procs[i] = None

    def stop(self) -> None:
        for i, p in enumerate(self.procs):
            if p and p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    self.kill_node(i)
            self.procs[i] = None

    def log(self, i: int) -> str:
        try:
            return (self.dir / f"n{i}" / "nats.log").read_text(errors="replace")
        except OSError:
            return ""


class RabbitCluster:
    """Three private RabbitMQ 3.10 nodes (rabbitmq_mqtt) formed into one cluster at boot
    (classic_config peer discovery), one epmd of their own on a free port, one cookie. With
    ``mqtt.durable_queue_type = quorum`` an MQTT session's queue is a quorum queue replicated on
    all three nodes (the default, ``classic``, lives on the node the client was on)."""

    SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
    CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"

    def __init__(self, workdir: Path, queue_type: str = "quorum") -> None:
        if not os.path.exists(self.SERVER) or not shutil.which("erl"):
            raise RuntimeError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.dir = workdir
        self.epmd_port = free_port()
        self.cookie = f"mqttdcluster{self.epmd_port}"
        self.queue_type = queue_type
        self.nodes = [{"name": f"mqttdrq{i}x{self.epmd_port}@localhost", "mqtt": free_port(), "amqp": free_port(),
                       "dist": free_port(), "dir": workdir / f"n{i}"} for i in range(3)]
        self.mqtt_ports = [n["mqtt"] for n in self.nodes]
        self.procs: list[subprocess.Popen | None] = [None] * 3

    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.mqtt_ports]

    def env(self, n: dict) -> dict[str, str]:
        d = n["dir"]
        return {**os.environ, "HOME": str(d / "home"), "RABBITMQ_NODENAME": n["name"],
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(n["amqp"]),
                "RABBITMQ_DIST_PORT": str(n["dist"]), "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1", "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"), "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"), "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-setcookie {self.cookie}",
                "RABBITMQ_CTL_ERL_ARGS": f"-setcookie {self.cookie}"}

    def start(self, timeout: float = 180) -> RabbitCluster:
        for n in self.nodes:
            d = n["dir"]
            for sub in ("home", "mnesia", "log"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
            conf = [f"mqtt.listeners.tcp.default = 127.0.0.1:{n['mqtt']}", "mqtt.allow_anonymous = true",
                    "loopback_users = none", f"mqtt.durable_queue_type = {self.queue_type}", "mqtt.prefetch = 200",
                    "cluster_formation.peer_discovery_backend = classic_config"]
            conf += [f"cluster_formation.classic_config.nodes.{j + 1} = {m['name']}" for j, m in enumerate(self.nodes)]
            (d / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        for i, n in enumerate(self.nodes):
            self.procs[i] = subprocess.Popen([self.SERVER], env=self.env(n), stdout=open(n["dir"] / "server.out", "wb"),
                                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for p in self.mqtt_ports:
                wait_port(p, timeout=timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError("the RabbitMQ cluster did not start") from None
        return self

    def kill_node(self, i: int) -> None:
        p = self.procs[i]
        if p and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)         # the node's session: the script and its beam.smp
            p.wait(10)
        self.procs[i] = None

    def stop(self) -> None:
        for i, n in enumerate(self.nodes):
            p = self.procs[i]
            if p and p.poll() is None:
                try:
                    subprocess.run([self.CTL, "-n", n["name"], "stop"], env=self.env(n), capture_output=True, timeout=60)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                self.kill_node(i)
        for _ in range(5):           # the epmd these nodes started on their own port
            r = subprocess.run(["epmd", "-names"], env=self.env(self.nodes[0]), capture_output=True, timeout=10)
            if r.returncode != 0:
                break
            subprocess.run(["epmd", "-kill"], env=self.env(self.nodes[0]), capture_output=True, timeout=10)
            time.sleep(1.0)
