"""The end-to-end canary: the proof that the whole pipeline works, not just the process.

Every ``status.canary_interval`` seconds the daemon publishes ``{"sent": t}`` to
``mqttd/NAME/canary``; it comes back through the broker, the daemon's own subscription (never a
shared one), the router, the dispatcher (a ``SELECT 1`` inside the batch transaction) and the
commit. The round trip is recorded when that batch commits, just before its ack. A session that
silently lost its subscriptions, a stuck handler or a dead database all stop the canary.
"""
from __future__ import annotations

import json
import os
import time

from .identity import Identity
from .message import Message
from .router import Route
from .stats import Stats
from .topics import TopicFilter


class Canary:
    """End-to-end probe: published to mqttd/NAME/canary, received through our own subscription,
    router and dispatcher (a database round trip inside the batch transaction) and acked."""

    def __init__(self, identity: Identity, stats: Stats) -> None:
        self.topic = identity.canary_topic
        self.stats = stats
        self.seq = 0
        self.route = Route(TopicFilter.parse(self.topic), self._handle, qos=1, batch=True,
                           name="mqttd.canary", builtin=True)

    def _handle(self, msgs: list[Message]) -> None:
        from django.db import connection

        with connection.cursor() as cur:
            cur.execute("SELECT 1")

    def committed(self, batch: list[Message]) -> None:
        for m in batch:
            if m.topic == self.topic:
                try:
                    sent = float(json.loads(m.payload)["sent"])
                except (ValueError, KeyError, TypeError):
                    continue
                now = time.time()
                self.stats.canary_at = now
                self.stats.canary_rtt_ms = round((now - sent) * 1000, 1)

    def payload(self) -> str:
        self.seq += 1
        now = time.time()
        self.stats.canary_sent_at = now
        return json.dumps({"sent": now, "seq": self.seq, "pid": os.getpid()})
