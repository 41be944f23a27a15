"""The end-to-end canary: the proof that the whole pipeline works, not just the process.

Every ``status.canary_interval`` seconds the daemon publishes ``{"sent": t}`` to
``mqttd/NAME/canary``; it comes back through the broker, the daemon's own subscription (through
a share group of its own when the project shares its load, see ``mqttd.mqtt.shared``), the
router, the dispatcher (a ``SELECT 1`` inside the batch transaction) and the commit. The round
trip is recorded when that batch commits, just before its ack. A session that silently lost its
subscriptions, a stuck handler or a dead database all stop the canary.
"""
from __future__ import annotations

import json
import math
import os
import time

from mqttd.identity import Identity
from mqttd.ingest.peers import Peers
from mqttd.ingest.stats import Stats
from mqttd.message import Message
from mqttd.router import Route
from mqttd.topics import TopicFilter


class Canary:
    """End-to-end probe: published to mqttd/NAME/canary, received through our own subscription,
    router and dispatcher (a database round trip inside the batch transaction) and acked."""

    def __init__(self, identity: Identity, stats: Stats, client_id: str = "", share_group: str | None = None) -> None:
        self.topic = identity.canary_topic
        self.stats = stats
        self.client_id = client_id
        self.seq = 0
        # With shared subscriptions in use, the canary comes back through a $share/ filter too (a
        # group of its own per client: no other member can take it), so that it proves what the
        # routes rely on: a broker that does not deliver shared subscriptions stops the canary.
        group = None
        if share_group:
            group = f"{share_group}-canary-{''.join('_' if c in '/+#' else c for c in client_id)}"
        self.route = Route(TopicFilter.parse(self.topic, share_group=group), self._handle, qos=1, batch=True,
                           name="mqttd.canary", builtin=True)
        # The other members' canaries come through our own share group too: whose stopped
        # (mqttd.ingest.peers). Only with a shared group: without one there are no members.
        self.peers = Peers() if share_group else None
        self._last_payload: float | None = None

    def _handle(self, msgs: list[Message]) -> None:
        from django.db import connection

        with connection.cursor() as cur:
            cur.execute("SELECT 1")

    def committed(self, batch: list[Message]) -> None:
        """After commit: record the round trip of our own canary messages. Anyone can publish on
        the canary topic, so anything that is not a sane ``{"sent": <recent time>}`` is ignored."""
        for m in batch:
            if m.topic == self.topic:
                sent = _sent_at(m.payload, self.client_id)
                if sent is None:
                    peer = _sender(m.payload)
                    if self.peers is not None and peer and peer != self.client_id:
                        self.peers.seen(peer, time.time())
                    continue
                now = time.time()
                self.stats.canary_at = now
                self.stats.canary_rtt_ms = round((now - sent) * 1000, 1)

    def payload(self) -> str:
        """Called every ``status.canary_interval``: also the pace at which silent members are judged."""
        self.seq += 1
        now = time.time()
        if self.peers is not None and self._last_payload is not None:
            self.stats.group_warning = self.peers.check(self.stats.canary_at, now - self._last_payload, now)
        self._last_payload = now
        self.stats.canary_sent_at = now
        return json.dumps({"sent": now, "seq": self.seq, "pid": os.getpid(), "client": self.client_id})


def _sender(payload: bytes) -> str | None:
    """The client id in another member's canary payload, or None for anything else."""
    try:
        data = json.loads(payload)
    except (ValueError, TypeError, RecursionError):
        return None
    client = data.get("client") if isinstance(data, dict) else None
    return client if isinstance(client, str) and 0 < len(client) <= 256 else None


def _sent_at(payload: bytes, client_id: str = "") -> float | None:
    """The ``sent`` time of one of our own canary payloads, or None for anything else (another
    process's canary, garbage, a 400-digit number, NaN, a time that is not within a day of now)."""
    try:
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("client", client_id) != client_id:
            return None
        sent = float(data["sent"]) if isinstance(data.get("sent"), (int, float)) else None
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None
    if sent is None or not math.isfinite(sent) or abs(time.time() - sent) > 86400:
        return None
    return sent
