"""mqttd.publish from the tenant's Django and Celery code: one connection per process, fork-safe.

Given the seed story (a module-level client inherited by a Celery prefork pool delivered 0 of 200),
these tests run a real Celery prefork worker, real forks, real threads and a real mosquitto.
"""
from __future__ import annotations

import json
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

from mqttd.config import BrokerConfig
from mqttd.errors import ConfigError, PublishError
from mqttd.publisher import Publisher, _from_django, resolve
from support.daemon import write_config
from support.db import TENANT_DIR

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

    def __init__(self, port: int, topic: str) -> None:
        self.topic = topic
        self.payloads: list[bytes] = []
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"collector-{uuid.uuid4().hex[:6]}",
                                  protocol=paho.MQTTv311)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_disconnect = lambda *a: self.ready.clear()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert self.ready.wait(10), "collector could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self._lock:
            self.payloads.append(msg.payload)

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

    def make(topic: str) -> Collector:
        made.append(Collector(mq.port, topic))
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
            "from mqttd import publish, publish_on_commit, Publisher; import mqttd.publisher as p; "
            "assert publish is p.publish and Publisher is p.Publisher and 'paho' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


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
    parent_id = pub.client_id

    pid = os.fork()
    if pid == 0:                                   # child: must make its own connection
        code = 1
        try:
            pub.publish(topic, "child")
            code = 0 if pub.client_id.endswith(f"-{os.getpid()}") and pub.connects == 1 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

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
