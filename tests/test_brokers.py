"""The broker conformance suite (issue 15, item 1; docs/brokers.md): the same stories on every
broker people run, each a private instance on free ports with its own data dir.

Brokers: Mosquitto 2.0, RabbitMQ 3.10 (rabbitmq_mqtt), NATS 2.9 (MQTT gateway + JetStream),
aedes 1.2 (LevelDB sessions), ejabberd 23.01 (mod_mqtt, MQTT 5). Every broker gets the quick
stories (store N, status and health, retained status and will, dedupe, a persistent session
across a daemon stop, a SIGKILL mid-stream, a broker restart); the heavy SIGKILL run (thousands
of messages) runs on Mosquitto only, to keep CI's time. A broker that cannot be started here
fails its tests with the reason under CI (``MQTTD_CI=1``, set by .ci/run) and skips them locally.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support import aedes, ejabberd
from lab.broker import Broker
from lab.daemon import write_config
from lab.db import TenantDB
from support.nats import NatsBroker
from lab.publish import telemetry
from support.rabbitmq import RabbitBroker
from lab.waits import wait_rows, wait_until

CI = bool(os.environ.get("MQTTD_CI") or os.environ.get("CI"))


@dataclass
class Target:
    """One broker under test, behind the few verbs the stories need."""

    name: str
    impl: Any                                   # the support class instance: .port, .start(), .stop()
    protocol: str = "auto"                      # what mqttd is configured with ("auto" everywhere)
    username: str | None = None                 # ejabberd's mod_mqtt refuses a CONNECT without credentials
    password: str | None = None
    keeps_sessions_on_restart: bool = True
    n: int = 200                                # messages per story (ejabberd: one in flight at a time)
    restart: Callable[[], None] | None = None
    # what the daemon's status must show under "granted" on this broker (protocol "auto" negotiated)
    granted: dict[str, Any] = field(default_factory=lambda: {"protocol": "3.1.1"})

    @property
    def port(self) -> int:
        return self.impl.port

    def config(self, path: Path, **kw: Any) -> Path:
        extra = f'username = "{self.username}"\n' if self.username else ""
        return write_config(path, self.port, protocol=self.protocol, broker_extra=extra, **kw)

    def env(self) -> dict[str, str]:
        return {"MQTTD_BROKER_PASSWORD": self.password} if self.password else {}

    def client(self, client_id: str = "") -> paho.Client:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        if self.username:
            c.username_pw_set(self.username, self.password)
        return c

    def publish(self, topic: str, seqs: range | list[int], twice: bool = False) -> None:
        """QoS 1 publishes, returned once the broker confirmed every one (PUBACK)."""
        c = self.client()
        c.max_inflight_messages_set(100)
        c.connect("127.0.0.1", self.port, 30)
        c.loop_start()
        try:
            infos = [c.publish(topic.format(k=s % 3), json.dumps(telemetry(s)), qos=1)
                     for s in seqs for _ in range(2 if twice else 1)]
            for info in infos:
                info.wait_for_publish(60)
        finally:
            c.disconnect()
            c.loop_stop()


def _start(name: str, root: Path) -> Target:
    if name == "mosquitto":
        b = Broker(root).start()
        return Target(name, b, n=500, restart=b.restart, granted={"protocol": "5", "session_expiry": 86400})
    if name == "rabbitmq":
        # mqtt.prefetch 10 (its default) caps the in-flight window; 200 makes intake not the bottleneck
        r = RabbitBroker(root, prefetch=200).start()
        return Target(name, r, restart=lambda: (r.stop(), r.start()))
    if name == "nats":
        # ack_wait 3 s instead of 30 s: after the SIGKILL story the in-flight messages return sooner
        nb = NatsBroker(root, ack_wait="3s").start()
        return Target(name, nb, restart=lambda: (nb.stop(), nb.start()))
    if name == "aedes":
        a = aedes.AedesBroker(root, persistence="redis").start()      # LevelDB lost messages: docs/brokers.md
        return Target(name, a, restart=lambda: (a.stop(), a.start()))
    e = ejabberd.EjabberdBroker(root).start()
    # mod_mqtt: MQTT 5 with its own grants (a 300 s session whatever is asked), no shared subscriptions
    return Target(name, e, username="mqttd", password="anything", n=60, keeps_sessions_on_restart=False,
                  restart=lambda: (e.stop(), e.start()),
                  granted={"protocol": "5", "session_expiry": 300, "shared_subscriptions": False})


BROKERS = ["mosquitto", "rabbitmq", "nats", "aedes", "ejabberd"]


@pytest.fixture(scope="module", params=BROKERS)
def target(request, tmp_path_factory) -> Iterator[Target]:
    """One private instance per broker, shared by that broker's stories (each story its own
    project name, so its own client id and session)."""
    try:
        t = _start(request.param, tmp_path_factory.mktemp(request.param))
    except (RuntimeError, OSError, TimeoutError) as exc:
        if CI:
            pytest.fail(f"{request.param} could not be started: {exc}")
        pytest.skip(f"{request.param} could not be started here: {exc}")
    yield t
    getattr(t.impl, "close", t.impl.stop)()


@pytest.fixture(scope="module")
def _migrated(tmp_path_factory) -> Path:
    """One migrated SQLite file per module, copied for each story (a migrate costs ~2 s)."""
    path = tmp_path_factory.mktemp("template") / "tenant.sqlite3"
    TenantDB.sqlite(path).migrate()
    return path


@pytest.fixture
def sqlite_db(_migrated, tmp_path) -> TenantDB:
    shutil.copy(_migrated, tmp_path / "tenant.sqlite3")
    return TenantDB.sqlite(tmp_path / "tenant.sqlite3")


@pytest.fixture
def project(request) -> str:
    """A project name of its own per story (so a client id and a session of its own)."""
    return "b" + str(abs(hash(request.node.name)) % 10**8)


def _distinct(db) -> int:
    return db.scalar("select count(distinct seq) from sensors_reading")


def test_stores_every_message_reports_healthy_and_dedupes(target, project, host, sqlite_db, tmp_path):
    # Given mqttd on this broker with protocol "auto"
    cfg = target.config(tmp_path / "c.toml")
    d = host.start(project, cfg, sqlite_db, env=target.env())
    st = d.wait_connected(timeout=40)
    # it speaks what the broker speaks and shows what the broker granted
    st = d.wait_for(lambda s: s.get("granted"), what="the CONNACK's grants")
    assert {k: st["granted"].get(k) for k in target.granted} == target.granted, st["granted"]
    # when N messages are published
    target.publish("ble/dev-{k}/telemetry", range(target.n))
    # then every one is stored once
    wait_rows(sqlite_db, target.n, timeout=60)
    assert sqlite_db.scalar("select count(*) from sensors_reading") == target.n
    # and `status` and `health` say so
    st = d.wait_for(lambda s: s.get("handled", 0) >= target.n, what="handled counted")
    assert st["protocol"] in ("5", "3.1.1") and st["session_gaps"] == 0, st
    h = host.mqttd("health", "--project", project)
    assert h.returncode == 0, h.stdout + h.stderr
    s = host.mqttd("status", "--project", project)
    assert s.returncode == 0 and project in s.stdout, s.stdout + s.stderr
    # and a route with a dedupe key stores a message sent twice once
    target.publish("dedupe/dev-{k}/telemetry", range(10_000, 10_020), twice=True)
    wait_until(lambda: sqlite_db.scalar("select count(*) from sensors_reading where source='dedupe'") >= 20,
               what="deduped rows")
    st = d.wait_for(lambda s: s.get("duplicates_skipped", 0) >= 20, what="20 duplicates skipped")
    assert sqlite_db.scalar("select count(*) from sensors_reading where source='dedupe'") == 20
    assert d.stop() == 0


def test_retained_status_and_will(target, project, host, sqlite_db, tmp_path):
    # Given a running daemon: its retained status is "online" for a watcher arriving later
    d = host.start(project, target.config(tmp_path / "c.toml"), sqlite_db, env=target.env())
    d.wait_connected(timeout=40)
    seen: list[str] = []
    lock = threading.Lock()
    w = target.client()

    def on_message(_c, _u, m) -> None:  # noqa: ANN001
        with lock:
            seen.append(m.payload.decode())

    w.on_message = on_message
    w.on_connect = lambda c, *a: c.subscribe(f"mqttd/{project}/status", qos=1)
    w.connect("127.0.0.1", target.port, 30)
    w.loop_start()
    try:
        wait_until(lambda: "online" in seen, timeout=15, what="retained 'online'")
        # when the daemon dies without a word (SIGKILL) the broker publishes its will
        d.kill()
        wait_until(lambda: seen[-1:] == ["offline"], timeout=30, what="the will ('offline')")
    finally:
        w.disconnect()
        w.loop_stop()


def test_a_persistent_session_keeps_messages_while_the_daemon_is_stopped(target, project, host, sqlite_db,
                                                                          tmp_path):
    if target.keeps_sessions_on_restart:
        pytest.skip("covered by the broker-restart story (daemon stopped, messages queued, then the restart)")
    cfg = target.config(tmp_path / "c.toml")
    d = host.start(project, cfg, sqlite_db, env=target.env())
    d.wait_connected(timeout=40)
    assert d.stop() == 0
    # While it is stopped, N messages are queued in its session
    target.publish("ble/dev-{k}/telemetry", range(target.n))
    d = host.start(project, cfg, sqlite_db, env=target.env())
    wait_rows(sqlite_db, target.n, timeout=90)
    assert d.wait_connected()["session_gaps"] == 0
    assert d.stop() == 0


def _kill_mid_stream(target: Target, project: str, host, db, cfg: Path, n: int) -> dict:  # noqa: ANN001
    """Publish n messages, SIGKILL the daemon once some are stored, start it again: returns the
    final status. Every message must be stored (duplicates allowed: they are counted)."""
    d = host.start(project, cfg, db, env=target.env())
    d.wait_connected(timeout=40)
    pub = threading.Thread(target=target.publish, args=("ble/dev-{k}/telemetry", range(n)))
    pub.start()
    wait_until(lambda: db.scalar("select count(*) from sensors_reading") >= n // 5, timeout=60,
               what="a fifth stored", interval=0.02)
    d.kill()
    pub.join(120)
    d = host.start(project, cfg, db, env=target.env())
    wait_rows(db, n, what="count(distinct seq)", timeout=120)
    st = d.wait_connected()
    assert d.stop() == 0
    return st


def test_sigkill_of_the_daemon_mid_stream_loses_nothing(target, project, host, sqlite_db, tmp_path):
    _kill_mid_stream(target, project, host, sqlite_db, target.config(tmp_path / "c.toml"), target.n)
    assert _distinct(sqlite_db) == target.n


def _wait_rows_or_explain(target: Target, d, db: TenantDB, n: int) -> None:
    """wait_rows, and on a shortfall say whose it is: what the daemon was given by the broker (its
    status accounts) against what is stored, with the tail of the broker's own log.

    aedes (with Redis) once came back from a restart 3 messages short of 200 in CI, never in 16 runs
    here; a 3.1.1 broker's drop is invisible to mqttd (no stamps). When the daemon's own accounts
    show that it stored every message it was given, the shortfall is the broker's: on aedes that is
    recorded as an expected failure naming the figure (docs/brokers.md), anywhere else it fails."""
    try:
        wait_rows(db, n, timeout=90)
        return
    except AssertionError as exc:
        shortfall = str(exc)
    st = d.status()
    keys = ("received", "handled", "dead_letters", "duplicates_skipped", "unrouted", "canary", "in_flight")
    counts = {k: st.get(k) for k in (*keys, "reconnects", "last_error")}
    stored = db.scalar("select count(*) from sensors_reading")
    adds_up = st["received"] == sum(st[k] for k in keys[1:])
    all_given_stored = adds_up and st["in_flight"] == 0 and st["dead_letters"] == 0 and st["handled"] == stored
    broker_log = ""
    for name in ("aedes.log", "mosquitto.log"):
        f = getattr(target.impl, "dir", Path("/nonexistent")) / name
        if f.exists():
            broker_log = f.read_text(errors="replace")[-1500:]
    why = f"{shortfall}; daemon accounts {counts}; broker log tail: {broker_log!r}"
    if all_given_stored and target.name == "aedes":
        pytest.xfail(f"aedes delivered {stored} of {n} queued messages after its restart; the daemon stored "
                     f"all {stored} it was given ({why})")
    raise AssertionError(why)


def test_a_broker_restart_loses_nothing_or_is_announced(target, project, host, sqlite_db, tmp_path):
    # Given a daemon connected, and N messages queued while it is stopped
    cfg = target.config(tmp_path / "c.toml")
    d = host.start(project, cfg, sqlite_db, env=target.env())
    d.wait_connected(timeout=40)
    assert d.stop() == 0
    target.publish("ble/dev-{k}/telemetry", range(target.n))
    # when the broker restarts (gracefully) before the daemon returns
    target.restart()
    d = host.start(project, cfg, sqlite_db, env=target.env())
    st = d.wait_connected(timeout=60)
    if target.keeps_sessions_on_restart:
        # then every queued message is delivered
        _wait_rows_or_explain(target, d, sqlite_db, target.n)
        assert d.status()["session_gaps"] == 0
    else:
        # a broker that forgets sessions on restart: the loss is announced, never silent
        d.wait_for(lambda s: s.get("session_gaps", 0) >= 1, what="the lost session announced")
        assert "session" in d.log()
    # and messages published after the restart are stored
    target.publish("ble/dev-{k}/telemetry", range(target.n, target.n + 20))
    wait_until(lambda: sqlite_db.scalar(f"select count(*) from sensors_reading where seq >= {target.n}") >= 20,
               what="post-restart messages")
    assert st["connected"] and d.stop() == 0


@pytest.mark.slow
def test_heavy_sigkill_mid_stream_on_mosquitto(host, sqlite_db, tmp_path, project):
    """The heavy case on one broker: 5,000 messages, a SIGKILL at a fifth; nothing lost."""
    b = Broker(tmp_path / "mosq").start()
    try:
        t = Target("mosquitto", b)
        st = _kill_mid_stream(t, project, host, sqlite_db, t.config(tmp_path / "c.toml"), 5000)
        assert _distinct(sqlite_db) == 5000
        assert st["session_gaps"] == 0
    finally:
        b.stop()

