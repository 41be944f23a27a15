"""Publishing from the tenant's own code (Django views, Celery tasks): one connection per process.

Why this module exists: a module-level paho client created before a Celery prefork pool forks
is inherited by every child as a dead copy (no network thread, the parent's socket), so its
publishes go nowhere; a client per task works but floods the broker with connections. Here:

- One paho client per *process*, created lazily on first use and shared by its threads. paho's
  ``loop_start()`` thread owns the socket, so ``publish()`` from any thread only appends to a deque
  and pokes a socketpair (research/reliability-facts.md §4); a lock still serialises that hand-off.
- ``os.register_at_fork(after_in_child=...)`` makes the child forget the inherited client: it closes
  only its own copies of the file descriptors (``close()`` on a shared descriptor sends nothing; the
  parent's connection stays up) and never calls ``disconnect()`` or ``loop_stop()``, which would
  send DISCONNECT on the parent's socket or join a thread that does not exist in the child. A PID
  check on every use covers forks the hook does not see.
- Client id ``NAME-pub-HOST-PID``, recomputed per process, with a clean session: it can never take
  over the daemon's ``NAME-HOST`` session, and a publisher has no subscriptions to keep.
- ``connect_async`` + ``loop_start``: a broker that is down at first use does not raise; paho keeps
  reconnecting with ``reconnect_min``..``reconnect_max`` backoff, and publish() fails with
  ``PublishError`` within its timeout until the broker is back.

Kept apart from ``mqttd.mqtt.session`` on purpose: that is the daemon's hot path. Both build
their paho client with ``mqttd.mqtt.client.new_client``, so TLS and credentials cannot differ.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from .config import BrokerConfig, config_path, load, parse_broker
from .errors import ConfigError, PublishError
from .identity import derive, short_hostname, validate_name
from .mqtt.client import new_client

log = logging.getLogger("mqttd.publisher")

DEFAULT_TIMEOUT = 10.0
MAX_QUEUED = 10_000     # unconfirmed messages held by paho before publish() fails fast
SETTINGS_NAME = "MQTTD_PUBLISHER"

Payload = bytes | bytearray | str | int | float | None


@dataclass(frozen=True)
class PublisherSettings:
    """Where a publisher connects and what it calls itself."""

    broker: BrokerConfig
    project: str
    timeout: float = DEFAULT_TIMEOUT
    source: str = "arguments"


def resolve(broker: BrokerConfig | None = None, project: str | None = None,
            env: Mapping[str, str] | None = None) -> PublisherSettings:
    """The ``broker`` given, else the daemon's TOML (``MQTTD_CONFIG``, or ``/etc/mqttd/PROJECT.toml``
    with PROJECT from ``MQTTD_PROJECT``), else Django's ``settings.MQTTD_PUBLISHER``."""
    env = os.environ if env is None else env
    given = project
    project = project or env.get("MQTTD_PROJECT") or env.get("PROJECT_NAME")
    if broker is not None:
        return PublisherSettings(broker, _need_project(project, "arguments"))
    tried = []
    explicit = env.get("MQTTD_CONFIG")
    if explicit or project:
        path = Path(explicit) if explicit else config_path(None, derive(validate_name(project)), env)
        if explicit or path.exists():
            return PublisherSettings(load(path, env).broker, _need_project(project, str(path)), source=str(path))
        tried.append(str(path))
    table = _django_settings()
    if table is not None:
        return _from_django(table, given, env)
    tried.append(f"Django settings.{SETTINGS_NAME}")
    raise ConfigError(f"no broker configuration for the publisher (tried MQTTD_CONFIG, {', '.join(tried)}); "
                      "set MQTTD_CONFIG, MQTTD_PROJECT or settings.MQTTD_PUBLISHER", key="publisher")


def _need_project(project: str | None, source: str) -> str:
    if not project:
        raise ConfigError("no project name for the publisher's client id: pass project=, set MQTTD_PROJECT, "
                          f'or add "project" to settings.{SETTINGS_NAME}', file=source)
    return validate_name(project)


def _django_settings() -> Mapping[str, Any] | None:
    """settings.MQTTD_PUBLISHER when Django is configured; Django is never imported otherwise."""
    import sys

    if "django" not in sys.modules and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return None
    try:
        from django.conf import settings
    except ImportError:
        return None
    if not (settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE")):
        return None
    return getattr(settings, SETTINGS_NAME, None)   # a broken settings module raises here, as it should


def _from_django(table: Any, project: str | None, env: Mapping[str, str]) -> PublisherSettings:
    """Project name: ``project`` (the caller's), else the table's "project", else MQTTD_PROJECT."""
    source = f"settings.{SETTINGS_NAME}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"must be a dict, not {type(table).__name__}", file="Django settings", key=SETTINGS_NAME)
    table = dict(table)
    project = project or table.pop("project", None) or env.get("MQTTD_PROJECT") or env.get("PROJECT_NAME")
    table.pop("project", None)
    timeout = table.pop("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"must be a positive number of seconds, not {timeout!r}", file="Django settings",
                          key=f"{SETTINGS_NAME}.timeout")
    broker = parse_broker(table, "Django settings", SETTINGS_NAME, env)
    return PublisherSettings(broker, _need_project(project, source), float(timeout), source)


class _Connection:
    """One paho client and its network thread, owned by the process that created it."""

    def __init__(self, broker: BrokerConfig, client_id: str) -> None:
        self.broker, self.client_id, self.pid = broker, client_id, os.getpid()
        self.connected = threading.Event()
        self.connects = 0
        self.last_error: str | None = None
        self.closing = False
        v5 = broker.protocol == "5"
        c = new_client(broker, client_id, persistent=False)
        c.reconnect_delay_set(broker.reconnect_min, broker.reconnect_max)  # type: ignore[arg-type]
        c.max_queued_messages_set(MAX_QUEUED)
        c.suppress_exceptions = True          # a callback bug must not kill the network thread (§4)
        c.on_log = self._on_log
        c.on_connect, c.on_disconnect, c.on_connect_fail = self._on_connect, self._on_disconnect, self._on_fail
        kwargs = {"clean_start": True} if v5 else {}
        c.connect_async(broker.host, broker.port, broker.keepalive, **kwargs)
        c.loop_start()
        self.client = c
        self.thread: threading.Thread | None = getattr(c, "_thread", None)

    @property
    def where(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    def alive(self) -> bool:
        return self.thread is None or self.thread.is_alive()

    def close(self, timeout: float = 2.0) -> None:
        """Orderly DISCONNECT; only ever called in the process that owns the connection."""
        self.closing = True
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - closing: nothing left to report to
            pass
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def abandon_inherited(self) -> None:
        """In a forked child: close this process's copies of the descriptors and nothing else."""
        for name in ("_sock", "_sockpairR", "_sockpairW"):
            sock = getattr(self.client, name, None)
            if sock is not None:
                try:
                    sock.close()          # close(), never shutdown(): no FIN, no DISCONNECT
                except OSError:
                    pass
                setattr(self.client, name, None)
        # Nothing else: the client's locks may have been held by the parent's threads at fork time.

    # paho callbacks (network thread); they only record state
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.last_error = f"broker refused the connection: {rc}"
            log.error("publisher %s: %s", self.client_id, self.last_error)
            return
        self.connects += 1
        self.last_error = None
        self.connected.set()
        log.info("publisher %s connected to %s", self.client_id, self.where)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if not self.closing:
            self.last_error = f"disconnected: {rc}"
            if was:
                log.warning("publisher %s lost its connection to %s: %s (reconnecting)", self.client_id, self.where, rc)

    def _on_fail(self, client: paho.Client, userdata: Any) -> None:
        self.last_error = f"cannot connect to {self.where}"

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        # Only a callback exception that suppress_exceptions swallowed; paho's other errors and
        # warnings repeat on every reconnect attempt and say less than on_disconnect does.
        if level == paho.MQTT_LOG_ERR and buf.startswith("Caught exception"):
            log.error("publisher %s: paho: %s", self.client_id, buf)


class Publisher:
    """A process-wide MQTT publisher: one connection per process, safe across fork and threads.

    Construction only resolves the configuration; the connection is made on first publish in
    each process. ``publish`` is safe to call from many threads at once.
    """

    def __init__(self, broker: BrokerConfig | None = None, *, project: str | None = None,
                 timeout: float | None = None) -> None:
        self.settings = resolve(broker, project)
        self.timeout = float(timeout if timeout is not None else self.settings.timeout)
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        _instances.add(self)

    @property
    def client_id(self) -> str:
        """``NAME-pub-HOST-PID`` for the calling process."""
        return f"{self.settings.project}-pub-{short_hostname()}-{os.getpid()}"

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.pid == os.getpid() and conn.connected.is_set()

    @property
    def connects(self) -> int:
        """Successful CONNACKs on this process's connection (1 means it never had to reconnect)."""
        conn = self._conn
        return conn.connects if conn is not None and conn.pid == os.getpid() else 0

    def publish(self, topic: str, payload: Payload = None, qos: int = 1, retain: bool = False,
                timeout: float | None = None) -> None:
        """Send one message; raise PublishError unless it is confirmed within ``timeout`` seconds.

        QoS 1 (and 2) return once the broker has acknowledged the message. QoS 0 returns once the
        message has been written to the socket: the broker never confirms it, so it may be lost.
        After a PublishError for QoS 1 the message may still arrive (paho resends it on reconnect):
        delivery is at least once, and a retry can duplicate it.
        """
        _check(topic, qos)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        conn = self._connection()
        if not conn.connected.wait(timeout):
            raise PublishError(f"publish to {topic!r} failed: not connected to {conn.where} within {timeout:g}s "
                               f"({conn.last_error or 'no answer yet'})")
        with self._lock:
            info = conn.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
            # The connection dropped just now; paho keeps the message and resends it on reconnect.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        elif info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise PublishError(f"publish to {topic!r} failed: {MAX_QUEUED} messages already wait for {conn.where}")
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise PublishError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        if not info.is_published():
            what = "not written to the socket" if qos == 0 else f"no acknowledgement from {conn.where}"
            why = "connection still up" if conn.connected.is_set() else conn.last_error or "connection lost"
            raise PublishError(f"publish to {topic!r} failed: {what} within {timeout:g}s ({why})")

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect this process's connection (a later publish reconnects)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and conn.pid == os.getpid():
            conn.close(timeout)

    def _connection(self) -> _Connection:
        if self._conn is not None and self._conn.pid != os.getpid():
            self._forget_inherited()          # a fork the at-fork hook did not see
        with self._lock:
            conn = self._conn
            if conn is not None and not conn.alive():
                # paho's network thread died (paho #894, #785): start over with a fresh client.
                log.warning("publisher %s: network thread died; reconnecting with a new client", conn.client_id)
                conn.close(0.5)
                conn = None
            if conn is None:
                conn = self._conn = _Connection(self.settings.broker, self.client_id)
            return conn

    def _forget_inherited(self) -> None:
        self._lock = threading.Lock()         # may have been held by another thread at fork time
        conn, self._conn = self._conn, None
        if conn is not None and conn.pid != os.getpid():
            conn.abandon_inherited()


def _check(topic: str, qos: int) -> None:
    if not isinstance(topic, str) or not topic or any(c in topic for c in "+#\0"):
        raise ValueError(f"invalid topic to publish to: {topic!r} (non-empty, no wildcards)")
    if qos not in (0, 1, 2):
        raise ValueError(f"invalid QoS {qos!r}: must be 0, 1 or 2")


_instances: weakref.WeakSet[Publisher] = weakref.WeakSet()
_default: Publisher | None = None
_default_lock = threading.Lock()


def default_publisher() -> Publisher:
    """The process-wide Publisher behind ``mqttd.publish``, created on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Publisher()
    return _default


def publish(topic: str, payload: Payload = None, qos: int = 1, retain: bool = False,
            timeout: float | None = None) -> None:
    """Publish through the process-wide default Publisher (see ``Publisher.publish``)."""
    default_publisher().publish(topic, payload, qos=qos, retain=retain, timeout=timeout)


def publish_on_commit(topic: str, payload: Payload = None, qos: int = 1, retain: bool = False,
                      timeout: float | None = None, using: str | None = None, robust: bool = False) -> None:
    """Publish only if the surrounding Django transaction commits (at once in autocommit mode).

    A rolled-back transaction sends nothing. A failure after the commit raises PublishError from
    the commit point, as Django's ``on_commit`` does; ``robust=True`` logs it instead.
    """
    from django.db import transaction

    _check(topic, qos)
    if isinstance(payload, bytearray):
        payload = bytes(payload)          # the caller may reuse the buffer before the commit
    send = functools.partial(publish, topic, payload, qos=qos, retain=retain, timeout=timeout)
    transaction.on_commit(send, using=using, robust=robust)


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for pub in list(_instances):
        pub._forget_inherited()


def _close_at_exit() -> None:
    for pub in list(_instances):
        conn = pub._conn
        if conn is not None and conn.pid == os.getpid():
            conn.close(1.0)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)

__all__ = ["Publisher", "PublisherSettings", "default_publisher", "publish", "publish_on_commit", "resolve",
           "DEFAULT_TIMEOUT"]
