"""Shared subscriptions that cannot silently eat messages.

RabbitMQ (before 3.13), NATS, aedes and amqtt accept ``$share/GROUP/filter`` as an ordinary filter
that no topic ever matches: a project with ``shared_group`` (or ``numprocs > 1``) would then store
nothing while looking healthy. So a process that subscribes through shared filters proves, once,
on its first connection, that the broker delivers through them:

- MQTT 5: a CONNACK that says ``SharedSubscriptionAvailable: 0`` ends it at once;
- a SUBACK that refuses the shared canary filter ends it;
- otherwise it publishes a probe to its own canary topic, which it subscribes to through a share
  group of its own; nothing back within ``PROBE_S`` ends it.

Each ends the process with a ``ConfigError`` (exit 78): no restart can fix the broker. The canary
keeps going through the shared filter afterwards, so ``health`` sees what the routes see.
"""
from __future__ import annotations

import time

from mqttd.errors import ConfigError

PROBE_S = 15.0       # a broker delivers a message to its own publisher's subscription in milliseconds


def not_delivered(reason: str, key: str, file: str | None = None) -> ConfigError:
    """The configuration error of a project that shares on a broker without shared subscriptions."""
    return ConfigError(f"{reason}: the broker does not deliver shared subscriptions, so every message routed "
                       "through $share/... would be lost. Use a broker that supports them (Mosquitto 2, EMQX, "
                       "HiveMQ, VerneMQ) or run a single process without shared_group", file=file, key=key)


class SharedCheck:
    """One process's proof that the broker delivers through ``$share/`` filters."""

    def __init__(self, canary_topic: str, subscription: str, key: str, file: str | None = None) -> None:
        self.topic = canary_topic
        self._topic_b = canary_topic.encode()
        self.subscription = subscription            # the canary's $share/... filter
        self.key, self.file = key, file             # the config key (and file) to name in the error
        self.verified = False
        self._deadline: float | None = None

    def _error(self, reason: str) -> ConfigError:
        return not_delivered(reason, self.key, self.file)

    def connack(self, properties: object) -> ConfigError | None:
        """Called on every successful CONNACK; the error if the broker says it has none (MQTT 5)."""
        if getattr(properties, "SharedSubscriptionAvailable", 1) == 0:
            return self._error("the broker's CONNACK says SharedSubscriptionAvailable: 0")
        if not self.verified:
            self._deadline = time.monotonic() + PROBE_S
        return None

    def suback(self, subscription: str, refused: bool, reason: str) -> ConfigError | None:
        if refused and subscription == self.subscription:
            return self._error(f"the broker refused the shared subscription {subscription} ({reason})")
        return None

    def probe_due(self) -> bool:
        """Publish a probe now? (once per connection until verified; the caller publishes it)"""
        return not self.verified and self._deadline is not None

    def received(self, topic: bytes) -> None:
        if not self.verified and topic == self._topic_b:
            self.verified = True
            self._deadline = None

    def overdue(self, connected: bool) -> ConfigError | None:
        """The error once the probe has had ``PROBE_S`` on a live connection and nothing came back."""
        if self.verified or self._deadline is None or not connected:
            return None
        if time.monotonic() < self._deadline:
            return None
        return self._error(f"the broker accepted the shared subscription {self.subscription} but delivered "
                           f"nothing through it within {PROBE_S:g}s")

    def disconnected(self) -> None:
        """A probe lost with its connection is tried again on the next one."""
        self._deadline = None
