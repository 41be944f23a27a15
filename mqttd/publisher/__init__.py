"""Publishing from the tenant's own code (Django views, Celery tasks): ``mqttd.publish`` and friends.

- ``publish(topic, payload)``: one message, returns once the broker confirmed it;
  ``publish(..., wait=False)`` returns its ``Confirm`` at once;
- ``publish_many([(topic, payload), ...])``: pipelined up to the in-flight window, returns when
  every message is confirmed or raises ``UnconfirmedError`` naming those that were not;
- ``publish_on_commit(...)``: sends only if the surrounding Django transaction commits.

All go through one process-wide ``Publisher`` (``default_publisher()``), configured by
``mqttd.publisher.settings.resolve``. Its connection lives in ``mqttd.mqtt.outbound``: this
package never imports paho itself. Over MQTT 5 every QoS 1/2 message carries the gap-detection
stamp (``mqttd.mqtt.stamp``).
"""
from __future__ import annotations

import atexit
import functools
import os
import threading
from collections.abc import Iterable

from mqttd.mqtt.outbound import Confirm
from mqttd.publisher.core import Payload, Publisher, UnconfirmedError, after_fork_in_child, check, encode, every_publisher
from mqttd.publisher.settings import DEFAULT_TIMEOUT, PublisherSettings, resolve

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
            timeout: float | None = None, *, wait: bool = True) -> Confirm:
    """Publish through the process-wide default Publisher (see ``Publisher.publish``)."""
    return default_publisher().publish(topic, payload, qos=qos, retain=retain, timeout=timeout, wait=wait)


def publish_many(messages: Iterable[tuple[str, Payload]], qos: int = 1, retain: bool = False,
                 timeout: float | None = None) -> list[Confirm]:
    """Publish many through the process-wide default Publisher (see ``Publisher.publish_many``)."""
    return default_publisher().publish_many(messages, qos=qos, retain=retain, timeout=timeout)


def publish_on_commit(topic: str, payload: Payload = None, qos: int = 1, retain: bool = False,
                      timeout: float | None = None, using: str | None = None, robust: bool = False) -> None:
    """Publish only if the surrounding Django transaction commits (at once in autocommit mode).

    A rolled-back transaction sends nothing. A failure after the commit raises PublishError from
    the commit point, as Django's ``on_commit`` does; ``robust=True`` logs it instead.
    """
    from django.db import transaction

    check(topic, qos)
    data = encode(payload)          # now: the caller may reuse the buffer before the commit
    send = functools.partial(publish, topic, data, qos=qos, retain=retain, timeout=timeout)
    transaction.on_commit(send, using=using, robust=robust)


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    after_fork_in_child()


def _close_at_exit() -> None:
    for pub in every_publisher():
        conn = pub._conn
        if conn is not None and conn.pid == os.getpid():
            conn.close(1.0)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)

__all__ = ["Confirm", "DEFAULT_TIMEOUT", "Publisher", "PublisherSettings", "UnconfirmedError", "default_publisher",
           "publish", "publish_many", "publish_on_commit", "resolve"]
