"""mqttd.publish from the tenant's Django and Celery code: one connection per process, fork-safe.

Given the seed story (a module-level client inherited by a Celery prefork pool delivered 0 of 200),
these tests run a real Celery prefork worker, real forks, real threads and a real mosquitto.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from lab.daemon import write_config
from lab.db import TENANT_DIR

from mqttd.config import BrokerConfig
from mqttd.errors import ConfigError, PublishError
from mqttd.mqtt import outbound, pubwire, stamp
from mqttd.mqtt.stamp import Stamp
from mqttd.publisher import Publisher, UnconfirmedError, resolve
from mqttd.publisher.settings import _from_django

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
_CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(")


# ---- helpers --------------------------------------------------------------------------------------
@pytest.fixture
def mq(broker):
    """The `broker` fixture, made sure to write its log when the tests run as root (mosquitto would
    drop to the `mosquitto` user, who cannot write into pytest's 0700 tmp dir)."""
    if os.geteuid() == 0 and "user root" not in broker.conf_path.read_text():
        broker.extra = f"{broker.extra}\nuser root"
        broker.restart()
    return broker


def connections(broker, prefix: str) -> list[str]:
    """Client ids of every successful connect whose id starts with ``prefix``, in log order."""
    return [m.group(1) for m in _CONNECTED.finditer(broker.log()) if m.group(1).startswith(prefix)]


def fresh_topic(name: str) -> str:
    return f"test/pub/{name}/{uuid.uuid4().hex[:8]}"


class Collector:
    """A subscriber that records every payload on one topic; resubscribes after a reconnect."""

    def __init__(self, port: int, topic: str, v5: bool = False) -> None:
        self.topic = topic
        self.payloads: list[bytes] = []
        self.stamps: list[tuple[str, str] | None] = []      # (mqttd-pub, mqttd-seq) per message, on v5
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"collector-{uuid.uuid4().hex[:6]}",
                                  protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_disconnect = lambda *a: self.ready.clear()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert self.ready.wait(10), "collector could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        props = dict(getattr(msg.properties, "UserProperty", None) or ())
        with self._lock:
            self.payloads.append(msg.payload)
            self.stamps.append((props["mqttd-pub"], props["mqttd-seq"]) if "mqttd-pub" in props else None)

    def count(self) -> int:
        with self._lock:
            return len(self.payloads)

    def wait_for(self, n: int, timeout: float = 30.0, settle: float = 0.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while self.count() < n and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(settle)          # anything past n (duplicates, stray sends) arrives meanwhile
        with self._lock:
            return list(self.payloads)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collect(mq):
    made: list[Collector] = []

    def make(topic: str, v5: bool = False) -> Collector:
        made.append(Collector(mq.port, topic, v5))
        return made[-1]

    yield make
    for c in made:
        c.close()


def broker_cfg(port: int, **kw: object) -> BrokerConfig:
    return BrokerConfig(host="127.0.0.1", port=port, reconnect_min=0.1, reconnect_max=1.0, **kw)  # type: ignore[arg-type]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTTD_", "CELERY_", "DJANGO_", "TENANT_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS_DIR)])
    env.update(extra)
    return env


# ---- import and configuration ---------------------------------------------------------------------
def test_import_mqttd_stays_light_and_exports_the_publisher_lazily():
    code = ("import sys, mqttd; assert not [m for m in sys.modules if m.startswith(('paho', 'django'))], 'heavy import'; "
            "from mqttd import publish, publish_many, publish_on_commit, Publisher; import mqttd.publisher as p; "
            "assert publish is p.publish and publish_many is p.publish_many and Publisher is p.Publisher; "
            "assert 'paho' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_publisher_package_leaves_paho_to_mqttd_mqtt():
    # Issue 12: the tenant API must not import paho itself; its connection lives in mqttd/mqtt/.
    for path in (ROOT / "mqttd" / "publisher").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from) paho", text, re.M), f"{path.name} imports paho"


def test_configuration_comes_from_the_daemons_toml_or_django_settings(tmp_path: Path):
    toml = write_config(tmp_path / "bnp.toml", 18830, protocol="3.1.1")
    s = resolve(env={"MQTTD_CONFIG": str(toml), "MQTTD_PROJECT": "bnp"})
    assert (s.broker.port, s.broker.protocol, s.project, s.source) == (18830, "3.1.1", "bnp", str(toml))
    with pytest.raises(ConfigError, match="project name"):
        resolve(env={"MQTTD_CONFIG": str(toml)})
    with pytest.raises(ConfigError, match="no broker configuration"):
        resolve(env={"MQTTD_PROJECT": "no-such-project-here"})
    with pytest.raises(ConfigError, match="file not found"):
        resolve(env={"MQTTD_CONFIG": str(tmp_path / "missing.toml"), "MQTTD_PROJECT": "bnp"})

    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    s = _from_django({"host": "mq", "port": 1884, "username": "u", "password_file": str(secret),
                      "project": "shop", "timeout": 3}, None, {})
    assert (s.broker.host, s.broker.port, s.broker.password, s.project, s.timeout) == ("mq", 1884, "s3cret", "shop", 3.0)
    with pytest.raises(ConfigError, match=r"MQTTD_PUBLISHER\.password: unknown key \(put the password in password_file"):
        _from_django({"password": "plain", "project": "shop"}, None, {})
    with pytest.raises(ConfigError, match=r"MQTTD_PUBLISHER\.port: must be int"):
        _from_django({"port": "1883", "project": "shop"}, None, {})
    pub = Publisher(broker_cfg(1), project="shop")
    assert re.fullmatch(rf"shop-pub-[^.]+-{os.getpid()}", pub.client_id)


# ---- Celery prefork ---------------------------------------------------------------------------------
class Worker:
    """A real `celery worker --pool=prefork`, reaped by PID (children included)."""

    def __init__(self, tmp: Path, env: dict[str, str], concurrency: int = 2) -> None:
        self.log = tmp / "worker.log"
        self.children: set[int] = set()
        cmd = [sys.executable, "-m", "celery", "-A", "support.celery_app", "worker", "--pool=prefork",
               f"--concurrency={concurrency}", "--loglevel=INFO", "--without-mingle", "--without-gossip",
               "--without-heartbeat", "-n", f"w{uuid.uuid4().hex[:6]}@%h"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=TESTS_DIR, env=env, stdout=out, stderr=subprocess.STDOUT)

    def note_children(self) -> set[int]:
        for f in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            try:
                self.children |= {int(p) for p in f.read_text().split()}
            except OSError:
                pass
        return self.children

    def stop(self) -> None:
        self.note_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)        # warm shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self.children:                        # only the pool processes it started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_tasks(tmp: Path, task: str, topic: str, n: int, env: dict[str, str], collector: Collector,
              concurrency: int = 2, wait: float = 15.0) -> tuple[list[bytes], Worker]:
    from support.celery_app import make_app

    done = Path(env["CELERY_DONE_FILE"])
    worker = Worker(tmp, env, concurrency)
    producer = make_app(env["CELERY_FS_DIR"])
    try:
        for seq in range(n):
            producer.send_task(task, args=(topic, seq))
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and (not done.exists() or len(done.read_text().splitlines()) < n):
            assert worker.proc.poll() is None, f"celery worker died:\n{worker.log.read_text()[-3000:]}"
            worker.note_children()
            time.sleep(0.05)
        ran = len(done.read_text().splitlines()) if done.exists() else 0
        assert ran == n, f"only {ran}/{n} tasks ran:\n{worker.log.read_text()[-3000:]}"
        got = collector.wait_for(n, timeout=wait, settle=1.0)
        worker.note_children()
    finally:
        producer.close()
        worker.stop()
    return got, worker


def celery_env(tmp: Path, port: int, project: str, **extra: str) -> dict[str, str]:
    toml = write_config(tmp / f"{project}.toml", port)
    return clean_env(MQTTD_CONFIG=str(toml), MQTTD_PROJECT=project, CELERY_FS_DIR=str(tmp / "celery-fs"),
                     CELERY_DONE_FILE=str(tmp / "done.txt"), **extra)


def test_celery_prefork_worker_delivers_200_of_200_over_one_connection_per_process(mq, collect, tmp_path):
    topic = fresh_topic("celery")
    sub = collect(topic)
    env = celery_env(tmp_path, mq.port, "celerypub", CELERY_INIT_TOPIC=f"{topic}/init")
    got, worker = run_tasks(tmp_path, "mqttd_test.publish_one", topic, 200, env, sub)

    seqs = sorted(json.loads(p)["seq"] for p in got)
    assert set(seqs) == set(range(200)), f"{len(set(seqs))}/200 delivered"
    ids = connections(mq, "celerypub-pub-")
    assert len(ids) == len(set(ids)), f"a process reconnected: {ids}"
    pids = {int(i.rsplit("-", 1)[1]) for i in ids}
    assert worker.proc.pid in pids, "the worker's main process did not publish before forking"
    pool = pids - {worker.proc.pid}
    assert 1 <= len(pool) <= 2, f"one connection per pool process expected, saw {ids}"
    assert pool <= worker.children, f"publisher ids {ids} are not the pool's processes {worker.children}"


def test_seed_story_a_client_created_before_the_fork_delivers_nothing_from_the_pool(mq, collect, tmp_path):
    """The bug mqttd.publish exists for: kept here so a regression of the comparison is visible."""
    topic = fresh_topic("naive")
    sub = collect(topic)
    env = celery_env(tmp_path, mq.port, "naive", CELERY_NAIVE_PORT=str(mq.port))
    got, _ = run_tasks(tmp_path, "mqttd_test.naive_publish", topic, 200, env, sub, wait=2.0)
    assert len(got) < 20, f"the inherited client delivered {len(got)}/200; the seed story no longer reproduces"


# ---- fork, threads, outages -------------------------------------------------------------------------
def test_publisher_used_before_fork_works_in_parent_and_child_without_disturbing_the_parent(mq, collect):
    topic = fresh_topic("fork")
    sub = collect(topic)
    pub = Publisher(broker_cfg(mq.port), project="forktest", timeout=5)
    pub.publish(topic, "parent-before")
    parent_id, parent_pub_id = pub.client_id, pub.pub_id
    read_end, write_end = os.pipe()

    pid = os.fork()
    if pid == 0:                                   # child: must make its own connection
        code = 1
        try:
            pub.publish(topic, "child")
            os.write(write_end, str(pub.pub_id).encode())
            code = 0 if pub.client_id.endswith(f"-{os.getpid()}") and pub.connects == 1 else 3
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child_pub_id = os.read(read_end, 1000).decode()
    os.close(read_end)
    assert child_pub_id.startswith("forktest-pub-") and f"-{pid}-" in child_pub_id, child_pub_id
    assert parent_pub_id is not None and child_pub_id != parent_pub_id and pub.pub_id == parent_pub_id

    pub.publish(topic, "parent-after")
    assert pub.client_id == parent_id and pub.connects == 1, "the parent had to reconnect"
    got = sub.wait_for(3, timeout=10, settle=0.3)
    assert sorted(got) == [b"child", b"parent-after", b"parent-before"]
    assert connections(mq, "forktest-pub-") == [parent_id, f"{parent_id.rsplit('-', 1)[0]}-{pid}"]
    assert f"Client {parent_id} " not in mq.log(), "the broker saw the parent's connection end"
    pub.close()


def test_eight_threads_share_one_connection_and_deliver_8000_of_8000(mq, collect):
    topic = fresh_topic("threads")
    sub = collect(topic)
    pub = Publisher(broker_cfg(mq.port), project="threads", timeout=10)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(1000):
                pub.publish(topic, f"{t}:{i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    got = sub.wait_for(8000, timeout=30)
    assert set(got) == {f"{t}:{i}".encode() for t in range(8) for i in range(1000)}
    assert connections(mq, "threads-pub-") == [pub.client_id] and pub.connects == 1
    pub.close()


def test_broker_down_raises_publish_error_within_the_timeout_then_recovers(mq, collect):
    topic = fresh_topic("down")
    sub = collect(topic)
    pub = Publisher(broker_cfg(mq.port), project="downtest")
    pub.publish(topic, "before", timeout=5)

    mq.stop()
    started = time.monotonic()
    with pytest.raises(PublishError) as err:
        pub.publish(topic, "during", timeout=2)
    assert time.monotonic() - started < 3
    message = str(err.value)
    assert topic in message and "not connected" in message and "\n" not in message

    mq.start()
    assert sub.ready.wait(15), "collector did not come back"
    pub.publish(topic, "after", timeout=15)
    assert sub.wait_for(2, timeout=10, settle=0.3) == [b"before", b"after"]
    assert pub.connects == 2
    pub.close()


def test_first_use_with_the_broker_down_does_not_raise_from_the_constructor(mq):
    mq.stop()
    pub = Publisher(broker_cfg(mq.port), project="latestart")
    started = time.monotonic()
    with pytest.raises(PublishError, match="not connected"):
        pub.publish("test/pub/late", "x", timeout=1)
    assert time.monotonic() - started < 2
    mq.start()
    pub.publish("test/pub/late", "y", timeout=15)
    pub.publish("test/pub/late", "z", qos=0, timeout=5)
    pub.close()


# ---- confirms in bulk ------------------------------------------------------------------------------
def test_publish_without_waiting_returns_handles_the_broker_confirms(mq, collect):
    topic = fresh_topic("nowait")
    sub = collect(topic)
    pub = Publisher(broker_cfg(mq.port), project="nowait", timeout=10)

    # When 500 messages are published with wait=False, each call returns at once with a handle
    handles = [pub.publish(topic, f"m{i}", wait=False) for i in range(500)]
    assert not all(h.done for h in handles), "every handle was already confirmed: nothing was pipelined"
    # Then every handle is confirmed, with its own packet id, and the subscriber got every message
    for h in handles:
        h.wait(10)
    assert all(h.done and h.confirmed and h.error is None for h in handles)
    assert len({h.mid for h in handles[:100]}) == 100
    got = sub.wait_for(500, timeout=20)
    assert sorted(got) == sorted(f"m{i}".encode() for i in range(500))
    assert connections(mq, "nowait-pub-") == [pub.client_id]
    pub.close()


def test_publish_many_10000_messages_all_confirmed_and_all_received(mq, collect):
    topic = fresh_topic("many")
    sub = collect(topic)
    pub = Publisher(broker_cfg(mq.port), project="many", timeout=10)

    confirms = pub.publish_many((topic, f"{i}") for i in range(10_000))

    assert len(confirms) == 10_000 and all(c.confirmed for c in confirms)
    assert [c.index for c in confirms] == list(range(10_000))
    got = sub.wait_for(10_000, timeout=60, settle=0.5)
    assert sorted(int(p) for p in got) == list(range(10_000)), f"{len(got)} received"
    assert connections(mq, "many-pub-") == [pub.client_id] and pub.connects == 1
    pub.close()


def test_broker_stopped_mid_publish_many_raises_naming_the_unconfirmed_within_the_timeout(mq, collect):
    topic = fresh_topic("stopped")
    sub = collect(topic)
    pub = Publisher(broker_cfg(mq.port), project="stopped", timeout=2)
    n = 100_000
    stopped_at: list[float] = []

    def stop_when_flowing() -> None:
        while sub.count() < 500:
            time.sleep(0.005)
        mq.stop()
        stopped_at.append(time.monotonic())

    stopper = threading.Thread(target=stop_when_flowing)
    stopper.start()
    # When the broker stops while 100,000 messages are being published (timeout=2)
    with pytest.raises(UnconfirmedError) as err:
        pub.publish_many((topic, str(i)) for i in range(n))
    raised_at = time.monotonic()
    stopper.join(10)

    # Then publish_many raises within the timeout of the last confirm, naming what was not confirmed
    assert stopped_at and raised_at - stopped_at[0] < 2 + 2.0, raised_at - stopped_at[0]
    failed = err.value.unconfirmed
    assert isinstance(err.value, PublishError) and 0 < len(failed) < n
    first = failed[0]
    assert f"#{first.index} {topic!r}" in str(err.value) and "not confirmed" in str(err.value)
    assert f"{len(failed)} of {n}" in str(err.value) and "\n" not in str(err.value)
    # ... each exactly once, in order; those never sent were withdrawn and can never arrive
    indexes = [c.index for c in failed]
    assert indexes == sorted(set(indexes)) and indexes[-1] == n - 1
    assert not any(c.confirmed for c in failed)
    unsent = [c for c in failed if not c.sent]
    assert unsent and all(c.done and c.error and ("not sent" in c.error or "withdrawn" in c.error) for c in unsent)
    # ... while those in flight (at most the window) stay queued, resent on reconnect
    assert len(failed) - len(unsent) <= pub.window
    # ... and everything before the first unconfirmed message was confirmed
    assert first.index >= 500 - 1
    pub.close()


def test_every_qos1_message_carries_a_publisher_id_and_consecutive_sequence_numbers(mq, collect):
    topic = fresh_topic("stamps")
    sub = collect(topic, v5=True)
    pub = Publisher(broker_cfg(mq.port, protocol="5"), project="stamps", timeout=10)

    pub.publish(topic, "first")
    pub.publish_many((topic, f"bulk-{i}") for i in range(300))
    handles = [pub.publish(topic, f"nowait-{i}", wait=False) for i in range(50)]
    for h in handles:
        h.wait(10)
    pub.publish(topic, "qos0", qos=0)

    got = sub.wait_for(352, timeout=20, settle=0.3)
    assert len(got) == 352
    with sub._lock:
        stamps = dict(zip(sub.payloads, sub.stamps))
    stamped = [stamps[p] for p in got if p != b"qos0"]
    assert {s[0] for s in stamped if s} == {pub.pub_id}, "one publisher id for one process's connection"
    assert sorted(int(s[1]) for s in stamped if s) == list(range(1, 352)), "seqs 1..351, no gap, no repeat"
    assert stamps[b"qos0"] is None, "QoS 0 may be dropped by design: it carries no sequence number"
    # ... and the daemon's side reads them back from a Message's user properties
    assert stamp.read({"mqttd-pub": pub.pub_id, "mqttd-seq": "42"}) == (pub.pub_id, 42)
    assert stamp.read({"mqttd-seq": "42"}) is None and stamp.read({"mqttd-pub": "x", "mqttd-seq": "-1"}) is None
    assert pub.pub_id.startswith(pub.client_id + "-") and handles[-1].seq == 351
    pub.close()


def test_under_protocol_auto_the_publisher_stamps_where_the_broker_speaks_5_and_still_publishes_where_not(
        mq, collect, tmp_path, caplog):
    from support import aedes

    from mqttd.mqtt import negotiate

    negotiate._PUBLISHER_PROTOCOL.clear()        # what earlier tests of this process settled
    # Given the default protocol ("auto") against mosquitto (MQTT 5): the messages carry the stamp
    topic = fresh_topic("auto")
    sub = collect(topic, v5=True)
    pub = Publisher(broker_cfg(mq.port), project="autoproto", timeout=10)
    pub.publish(topic, "one")
    pub.publish_many((topic, f"more-{i}") for i in range(20))
    sub.wait_for(21, timeout=10, settle=0.2)
    with sub._lock:
        assert len(sub.stamps) == 21 and {s[0] for s in sub.stamps if s} == {pub.pub_id}
        assert sorted(int(s[1]) for s in sub.stamps if s) == list(range(1, 22))
    # ... over one connection: no probe, no second client id (SPEC 5.4: one connection per process)
    assert "mqttd-probe" not in mq.log()
    assert connections(mq, "autoproto-") == [pub.client_id] and pub.connects == 1
    pub.close()
    # Given a broker that speaks only 3.1.1 (aedes): publishing works, unstamped, no refusal loop
    why = aedes.available()
    if why:
        pytest.fail(why) if os.environ.get("MQTTD_CI") else pytest.skip(why)
    old = aedes.AedesBroker(tmp_path / "aedes", persistence="memory").start()
    try:
        got: list[bytes] = []
        c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        c.on_message = lambda client, userdata, msg: got.append(msg.payload)
        c.connect("127.0.0.1", old.port)
        c.subscribe(topic, qos=1)
        c.loop_start()
        time.sleep(0.3)
        pub311 = Publisher(broker_cfg(old.port), project="autoproto", timeout=10)
        with caplog.at_level(logging.INFO, logger="mqttd.publisher"):
            pub311.publish(topic, "over 3.1.1")
        conn = pub311._connection()
        assert not conn.v5 and pub311.connects == 1
        assert conn.negotiation.reason == "CONNACK: Unsupported protocol version"
        said = [r.getMessage() for r in caplog.records if "refused MQTT 5" in r.getMessage()]
        assert len(said) == 1 and pub311.client_id in said[0], said
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"over 3.1.1"]
        assert negotiate._PUBLISHER_PROTOCOL[("127.0.0.1", old.port)] == "3.1.1"
        pub311.close()
        # An explicit "5" there is a configuration error: the publish says so, the log once
        caplog.clear()
        pub5 = Publisher(broker_cfg(old.port, protocol="5"), project="fiveproto", timeout=3)
        with caplog.at_level(logging.INFO, logger="mqttd.publisher"), pytest.raises(PublishError) as refused:
            pub5.publish(topic, "never")
        assert 'refuses MQTT 5' in str(refused.value) and 'protocol = "5"' in str(refused.value), refused.value
        said = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(said) == 1 and pub5.connects == 0, [r.getMessage() for r in caplog.records]
        pub5.close()
        c.loop_stop()
        c.disconnect()
    finally:
        old.close()


def test_two_publishers_of_one_project_in_one_process_do_not_take_each_other_over(mq, collect):
    topic = fresh_topic("twins")
    sub = collect(topic)
    first = Publisher(broker_cfg(mq.port), project="twins")
    second = Publisher(broker_cfg(mq.port), project="twins")
    for i in range(200):
        first.publish(topic, f"a{i}", wait=False)
        second.publish(topic, f"b{i}", wait=False)
    first.publish(topic, "a-last")
    second.publish(topic, "b-last")
    got = sub.wait_for(402, timeout=20, settle=0.5)
    assert len(got) == 402 and len(set(got)) == 402, "lost or duplicated messages"
    assert second.client_id == f"{first.client_id}-2"
    assert first.connects == 1 and second.connects == 1, "they took each other over at the broker"
    first.close()
    second.close()


def test_a_message_the_broker_refuses_raises_instead_of_passing_for_confirmed(mq, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite test/pub/#\n")          # anonymous clients: nothing else
    mq.extra = f"{mq.extra}\nacl_file {acl}"
    mq.restart()
    pub = Publisher(broker_cfg(mq.port, protocol="5"), project="refused", timeout=5)
    pub.publish(fresh_topic("allowed"), "ok")
    with pytest.raises(PublishError, match=r"'forbidden/x' failed: the broker refused it: Not authorized"):
        pub.publish("forbidden/x", "no")
    with pytest.raises(UnconfirmedError) as err:
        pub.publish_many([(fresh_topic("allowed"), "1"), ("forbidden/y", "2"), (fresh_topic("allowed"), "3")])
    assert [c.index for c in err.value.unconfirmed] == [1] and "refused" in str(err.value)
    pub.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_fast_puback_path_leaves_paho_in_the_state_its_own_would(mq, collect, protocol):
    topic = fresh_topic("fastack")
    sub = collect(topic)
    pub = Publisher(broker_cfg(mq.port, protocol=protocol), project="fastack")
    confirms = pub.publish_many((topic, str(i)) for i in range(500))
    assert all(c.confirmed for c in confirms)
    client = pub._conn.client if pub._conn else None
    assert client is not None and "_handle_pubackcomp" in vars(client), "the fast path was not applied"
    # paho's own bookkeeping, as its _handle_pubackcomp leaves it: nothing left in flight
    assert client._out_messages == {} and client._inflight_messages == 0
    assert len(sub.wait_for(500, timeout=20)) == 500
    pub.close()


def test_the_stamp_is_packed_byte_for_byte_as_paho_would():
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    for pub_id, seq in [("shop-pub-web1-4242-0a1b2c3d", 1), ("p" * 300, 2**40)]:
        theirs = Properties(PacketTypes.PUBLISH)
        theirs.UserProperty = [("mqttd-pub", pub_id), ("mqttd-seq", str(seq))]
        assert Stamp.of(pub_id, seq).pack() == theirs.pack()


def paho_publish_bytes(protocol: int, topic: str, payload: bytes, mid: int, retain: bool, dup: bool,
                       properties: object = None) -> bytes:
    """What paho's own writer queues for this QoS 1 PUBLISH (its ``_send_publish``), captured."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="encoder-check", protocol=protocol)
    queued: list[bytes] = []
    client._sock = object()                  # paho only checks that there is a socket
    client._packet_queue = lambda cmd, packet, *a, **k: queued.append(bytes(packet))  # type: ignore[method-assign]
    client._send_publish(mid, topic.encode(), payload, 1, retain, dup, None, properties)
    client._sock = None
    return queued[0]


@pytest.mark.parametrize("protocol", ["3.1.1", "5", "5 stamped"])
@pytest.mark.parametrize("remaining", [2 + 1 + 2, 127, 128, 16383, 16384, 2_097_152])
def test_our_publish_encoder_writes_the_bytes_paho_would(protocol, remaining):
    # Given a message sized so that the packet's remaining length is exactly `remaining`
    topic, mid, pub_id, seq = "t/é", 0xBEEF, "shop-pub-web1-4242-0a1b2c3d", 123456
    stamped = protocol == "5 stamped"
    props = pubwire.stamp_properties(pub_id, seq) if stamped else (pubwire.NO_PROPERTIES if protocol != "3.1.1" else None)
    fixed = 2 + len(topic.encode()) + 2 + len(props or b"")
    payload = bytes(range(256)) * (max(remaining - fixed, 0) // 256 + 1)
    payload = payload[:max(remaining - fixed, 0)]
    for retain, dup in [(False, False), (True, True)]:
        # When we encode it, and paho encodes it
        ours = b"".join(pubwire.publish_qos1(topic, payload, mid, retain=retain, dup=dup, properties=props))
        theirs = paho_publish_bytes(paho.MQTTv311 if protocol == "3.1.1" else paho.MQTTv5, topic, payload, mid,
                                    retain, dup, Stamp.of(pub_id, seq) if stamped else None)
        # Then the bytes are the same, and the length is the one intended
        assert ours == theirs
        assert remaining < fixed or len(ours) == 1 + len(pubwire.remaining_length(remaining)) + remaining


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_without_the_paho_internals_we_expect_the_publisher_falls_back_to_plain_paho(mq, collect, protocol,
                                                                                      monkeypatch):
    # Given a paho without one of the internals our own writes use
    monkeypatch.setattr(outbound, "OWN_WRITES", (*outbound.OWN_WRITES, "_not_in_this_paho"))
    topic = fresh_topic("fallback")
    sub = collect(topic, v5=protocol == "5")
    pub = Publisher(broker_cfg(mq.port, protocol=protocol), project="fallback")
    # When 1,000 messages are published
    confirms = pub.publish_many((topic, str(i)) for i in range(1000))
    # Then they went through paho's publish(), every one confirmed and received, stamped on MQTT 5
    assert pub._conn is not None and not pub._conn.own_writes
    assert all(c.confirmed for c in confirms)
    assert sorted(int(p) for p in sub.wait_for(1000, timeout=20)) == list(range(1000))
    if protocol == "5":
        assert [int(s[1]) for s in sub.stamps if s] == list(range(1, 1001))
    pub.close()


def test_messages_in_flight_when_the_broker_restarts_are_resent_and_all_arrive(mq, tmp_path):
    # Given a subscriber with a persistent session (it misses nothing while the broker is away)
    topic, got, lock = fresh_topic("resend"), [], threading.Lock()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"resend-{uuid.uuid4().hex[:6]}", clean_session=False)
    sub.reconnect_delay_set(0.1, 0.5)
    subscribed = threading.Event()
    sub.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    sub.on_subscribe = lambda *a: subscribed.set()

    def on_message(client, userdata, msg) -> None:  # noqa: ANN001
        with lock:
            got.append(int(msg.payload))

    sub.on_message = on_message
    sub.connect("127.0.0.1", mq.port, 30)
    sub.loop_start()
    assert subscribed.wait(10)
    pub = Publisher(broker_cfg(mq.port), project="resend", timeout=30)
    n = 20_000

    def restart_when_flowing() -> None:
        while len(got) < 1000:
            time.sleep(0.005)
        mq.restart()                      # SIGTERM: mosquitto saves the subscriber's session

    restarter = threading.Thread(target=restart_when_flowing)
    restarter.start()
    # When the broker restarts in the middle of a publish_many
    confirms = pub.publish_many((topic, str(i)) for i in range(n))
    restarter.join(30)
    # Then publish_many still confirms every message, over a second connection
    assert all(c.confirmed for c in confirms) and pub.connects == 2
    # ... and every message arrives (those in flight at the restart resent: some may come twice)
    deadline = time.monotonic() + 30
    while len(set(got)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(got) == set(range(n)), f"{n - len(set(got))} missing"
    sub.disconnect()
    sub.loop_stop()
    pub.close()


def test_the_window_never_exceeds_the_brokers_receive_maximum(mq, collect):
    mq.extra = f"{mq.extra}\nmax_inflight_messages 5"
    mq.restart()
    topic = fresh_topic("window")
    sub = collect(topic)
    pub = Publisher(broker_cfg(mq.port, protocol="5"), project="window", window=100)
    pub.publish_many((topic, str(i)) for i in range(1000))
    assert pub._conn is not None and pub._conn.limit == 5
    assert len(sub.wait_for(1000, timeout=20)) == 1000
    pub.close()


# ---- Django -----------------------------------------------------------------------------------------
ON_COMMIT_SCRIPT = """
import sys
import django
django.setup()
from django.db import transaction
import mqttd
from mqttd import publisher
from sensors.models import Reading

topic = sys.argv[1]
class Rollback(Exception):
    pass
try:
    with transaction.atomic():
        Reading.objects.create(device="rolled-back", seq=1)
        mqttd.publish_on_commit(topic, "rolled-back")
        raise Rollback
except Rollback:
    pass
assert publisher._default is None, "a rolled-back transaction published"
with transaction.atomic():
    Reading.objects.create(device="committed", seq=2)
    mqttd.publish_on_commit(topic, "committed")
    assert publisher._default is None, "published before the commit"
assert publisher._default.connects == 1
print("ok")
"""


def test_publish_on_commit_sends_only_when_the_transaction_commits(mq, collect, sqlite_db, tmp_path):
    topic = fresh_topic("oncommit")
    sub = collect(topic)
    script = tmp_path / "on_commit.py"
    script.write_text(ON_COMMIT_SCRIPT)
    env = clean_env(**sqlite_db.env, DJANGO_SETTINGS_MODULE="tenant_site.settings", MQTTD_PROJECT="tenant",
                    MQTTD_CONFIG=str(write_config(tmp_path / "tenant.toml", mq.port)))
    env["PYTHONPATH"] += os.pathsep + str(TENANT_DIR)
    out = subprocess.run([sys.executable, str(script), topic], cwd=TENANT_DIR, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert sub.wait_for(1, timeout=10, settle=0.5) == [b"committed"]
    assert sqlite_db.query("SELECT device FROM sensors_reading") == [("committed",)]


SETTINGS_SCRIPT = """
import sys
from django.conf import settings
settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    MQTTD_PUBLISHER={"host": "127.0.0.1", "port": int(sys.argv[2]), "protocol": "3.1.1", "username": "shop",
                     "password_file": sys.argv[3], "project": "shop", "timeout": 5},
)
import django
django.setup()
import mqttd
mqttd.publish(sys.argv[1], "from-settings")
mqttd.publish_on_commit(sys.argv[1], "autocommit")   # no transaction: sent at once
print(mqttd.publisher.default_publisher().client_id)
"""


def test_django_settings_configure_the_publisher_when_there_is_no_toml(mq, collect, tmp_path):
    topic = fresh_topic("settings")
    sub = collect(topic)
    secret = tmp_path / "secret"
    secret.write_text("not-checked-by-this-broker\n")
    script = tmp_path / "settings_pub.py"
    script.write_text(SETTINGS_SCRIPT)
    out = subprocess.run([sys.executable, str(script), topic, str(mq.port), str(secret)], env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sub.wait_for(2, timeout=10, settle=0.3) == [b"from-settings", b"autocommit"]
    assert connections(mq, "shop-pub-") == [out.stdout.strip()]
