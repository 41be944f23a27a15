"""``Publisher``: one connection per process, shared by its threads, made afresh after ``fork()``.

Why: a module-level paho client created before a Celery prefork pool forks is inherited by every
child as a dead copy (no network thread, the parent's socket), so its publishes go nowhere; a
client per task works but floods the broker with connections. Here:

- One connection (``mqttd.mqtt.outbound.Outbound``) per *process*, made lazily on first use and
  shared by its threads; messages are pipelined up to the in-flight window and confirmed by the
  broker's PUBACKs (publisher confirms without a round trip per message).
- ``os.register_at_fork(after_in_child=...)`` (in ``mqttd.publisher``) makes the child forget the
  inherited connection: it closes only its own copies of the file descriptors (``close()`` on a
  shared descriptor sends nothing; the parent's connection stays up) and never calls
  ``disconnect()`` or ``loop_stop()``, which would send DISCONNECT on the parent's socket or join a
  thread that does not exist in the child. A PID check on every use covers forks the hook misses.
- Client id ``NAME-pub-HOST-PID``, recomputed per process, with a clean session: it can never take
  over the daemon's ``NAME-HOST`` session, and a publisher has no subscriptions to keep.
- A broker that is down at first use does not raise; paho keeps reconnecting with
  ``reconnect_min``..``reconnect_max`` backoff, and publishes fail with ``PublishError`` within
  their timeout until the broker is back.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable

from mqttd.config import BrokerConfig
from mqttd.errors import PublishError
from mqttd.identity import short_hostname
from mqttd.mqtt.outbound import DEFAULT_WINDOW, MAX_QUEUED, Confirm, Outbound
from mqttd.publisher.settings import resolve
from mqttd.topics import validate_topic

log = logging.getLogger("mqttd.publisher")

Payload = bytes | bytearray | str | int | float | None
MAX_PAYLOAD = 268_435_455   # MQTT: the whole packet's remaining length
SHOWN = 5       # unconfirmed messages named in a publish_many error (all are on the exception)


class UnconfirmedError(PublishError):
    """``publish_many``: some messages were not confirmed. ``unconfirmed`` lists their ``Confirm``
    receipts (``.index``, ``.topic``, ``.sent``: False means it never left and cannot arrive)."""

    def __init__(self, message: str, unconfirmed: list[Confirm]) -> None:
        super().__init__(message)
        self.unconfirmed = unconfirmed


def encode(payload: Payload) -> bytes:
    """The bytes paho would send for ``payload`` (its own rules), taken now: the caller may reuse
    a bytearray before the message leaves."""
    if payload is None:
        data = b""
    elif isinstance(payload, (bytes, bytearray)):
        data = bytes(payload)
    elif isinstance(payload, str):
        data = payload.encode("utf-8")
    elif isinstance(payload, (int, float)):
        data = str(payload).encode("ascii")
    else:
        raise TypeError(f"payload must be bytes, bytearray, str, int, float or None, not {type(payload).__name__}")
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(data)} bytes is over MQTT's limit of {MAX_PAYLOAD}")
    return data


def check(topic: str, qos: int) -> str:
    if not isinstance(topic, str):
        raise ValueError(f"invalid topic to publish to: {topic!r} (a str)")
    if qos not in (0, 1, 2):
        raise ValueError(f"invalid QoS {qos!r}: must be 0, 1 or 2")
    return validate_topic(topic)


class Publisher:
    """A process-wide MQTT publisher: one connection per process, safe across fork and threads.

    Construction only resolves the configuration; the connection is made on first publish in
    each process. Every method is safe to call from many threads at once.
    """

    def __init__(self, broker: BrokerConfig | None = None, *, project: str | None = None,
                 timeout: float | None = None, window: int = DEFAULT_WINDOW, max_queued: int = MAX_QUEUED) -> None:
        self.settings = resolve(broker, project)
        self.timeout = float(timeout if timeout is not None else self.settings.timeout)
        if window < 1 or max_queued < window:
            raise ValueError(f"window must be >= 1 and max_queued >= window, not {window} and {max_queued}")
        self.window, self.max_queued = window, max_queued
        self._lock = threading.Lock()
        self._conn: Outbound | None = None
        _instances.add(self)

    @property
    def client_id(self) -> str:
        """``NAME-pub-HOST-PID`` for the calling process (``-2``, ``-3`` ... appended for a second
        Publisher of the same project connected in the same process)."""
        conn = self._conn
        if conn is not None and conn.pid == os.getpid():
            return conn.client_id
        return f"{self.settings.project}-pub-{short_hostname()}-{os.getpid()}"

    def _free_client_id(self) -> str:
        # Two connections with one client id take each other over at the broker, back and forth,
        # each resending its messages in flight (seen: duplicates in the bench, where the default
        # publisher and a Publisher() of the same project shared a process).
        base = cid = self.client_id
        taken = {p._conn.client_id for p in every_publisher()
                 if p is not self and p._conn is not None and p._conn.pid == os.getpid()}
        n = 1
        while cid in taken:
            n += 1
            cid = f"{base}-{n}"
        return cid

    @property
    def pub_id(self) -> str | None:
        """The ``mqttd-pub`` stamp of this process's connection (None before the first publish)."""
        conn = self._conn
        return conn.pub_id if conn is not None and conn.pid == os.getpid() else None

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
                timeout: float | None = None, *, wait: bool = True) -> Confirm:
        """Send one message; with ``wait`` (the default) raise PublishError unless it is confirmed
        within ``timeout`` seconds. Returns its ``Confirm`` (already confirmed when ``wait``).

        QoS 1 (and 2) are confirmed by the broker's acknowledgement. QoS 0 only once written to
        the socket: the broker never confirms it, so it may be lost. After a PublishError the
        message may still arrive if it was sent (paho resends it on reconnect): delivery is at
        least once, and a retry can duplicate it. One that was never sent is withdrawn.

        ``wait=False`` returns at once (PublishError only if ``max_queued`` messages already
        wait); ``Confirm.wait(timeout)`` then raises what ``publish`` would have raised.
        """
        confirm = Confirm(check(topic, qos), encode(payload), qos, retain)
        self._connection().submit(confirm, defer=not wait)
        if wait:
            timeout = self.timeout if timeout is None else timeout
            try:
                confirm.wait(timeout)
            except PublishError:
                conn = confirm._conn
                if conn is not None:
                    conn.cancel(confirm, confirm.why_not(timeout))
                raise
        return confirm

    def publish_many(self, messages: Iterable[tuple[str, Payload]], qos: int = 1, retain: bool = False,
                     timeout: float | None = None) -> list[Confirm]:
        """Send every ``(topic, payload)`` pipelined over this process's connection; return their
        receipts once every one is confirmed.

        ``timeout`` bounds each wait for the next confirm, not the whole call (10,000 messages take
        longer than one): when no confirm comes for ``timeout`` seconds, the messages not sent yet
        are withdrawn and ``UnconfirmedError`` (a PublishError) names the ones not confirmed.
        Topics are all checked before anything is sent.
        """
        items = [(check(topic, qos), encode(payload)) for topic, payload in messages]
        timeout = self.timeout if timeout is None else timeout
        conn = self._connection()
        confirms = [Confirm(topic, payload, qos, retain, index) for index, (topic, payload) in enumerate(items)]
        # Queued in one go (one lock, one pump), waiting while max_queued are unconfirmed.
        queued = conn.submit_many(confirms, block=timeout)
        if queued == len(confirms):
            _await(conn, confirms, timeout)
        del confirms[queued:]                   # never queued: made afresh below, "not sent"
        failed = [c for c in confirms if not c.confirmed]
        if not failed and len(confirms) == len(items):
            return confirms
        why = failed[0].why_not(timeout) if failed else "the queue stayed full"
        conn.cancel_all(failed, f"withdrawn: {why}")
        rest = [Confirm(topic, payload, qos, retain, i) for i, (topic, payload) in enumerate(items)
                if i >= len(confirms)]
        for confirm in rest:
            confirm._finish(f"not sent: {why}")
        failed += rest
        named = ", ".join(f"#{c.index} {c.topic!r}" for c in failed[:SHOWN])
        more = f" and {len(failed) - SHOWN} more" if len(failed) > SHOWN else ""
        unsent = sum(not c.sent for c in failed)
        raise UnconfirmedError(f"publish_many: {len(failed)} of {len(items)} messages not confirmed ({why}; "
                               f"{unsent} never sent, withdrawn): {named}{more}", failed)

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect this process's connection (a later publish reconnects)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and conn.pid == os.getpid():
            conn.close(timeout)

    def _connection(self) -> Outbound:
        if self._conn is not None and self._conn.pid != os.getpid():
            self.forget_inherited()          # a fork the at-fork hook did not see
        with self._lock:
            conn = self._conn
            if conn is not None and not conn.alive():
                # paho's network thread died (paho #894, #785): start over with a fresh client.
                log.warning("publisher %s: network thread died; reconnecting with a new client", conn.client_id)
                conn.close(0.5)
                conn = None
            if conn is None:
                with _ids_lock:
                    conn = self._conn = Outbound(self.settings.broker, self._free_client_id(), window=self.window,
                                                 max_queued=self.max_queued)
            return conn

    def forget_inherited(self) -> None:
        """In a forked child: drop the parent's connection without touching it."""
        self._lock = threading.Lock()         # may have been held by another thread at fork time
        conn, self._conn = self._conn, None
        if conn is not None and conn.pid != os.getpid():
            conn.abandon_inherited()


def _await(conn: Outbound, confirms: list[Confirm], timeout: float) -> None:
    """Wait until every confirm is done, or none has been for ``timeout`` seconds.

    Waits on the last one (PUBACKs come in PUBLISH order, MQTT §4.6), looking at the progress
    ten times a second: waiting on each in turn cost a thread switch per message (measured:
    2.5x slower). Messages resent after a reconnect may be confirmed after later ones: those are
    waited for one by one at the end."""
    for confirm in confirms[-1:] + confirms:
        seen, deadline = -1, 0.0
        while not confirm.done:
            now, progress = time.monotonic(), conn.settled_count
            if progress != seen:
                seen, deadline = progress, now + timeout
            if now >= deadline:
                return                  # nothing confirmed for `timeout` seconds
            confirm.settled(min(deadline - now, 0.1))


_instances: weakref.WeakSet[Publisher] = weakref.WeakSet()
_ids_lock = threading.Lock()


def every_publisher() -> list[Publisher]:
    return list(_instances)


def after_fork_in_child() -> None:
    """Forget every connection inherited from the parent (see the module docstring)."""
    global _ids_lock
    _ids_lock = threading.Lock()           # may have been held by another thread at fork time
    for pub in every_publisher():
        pub.forget_inherited()
