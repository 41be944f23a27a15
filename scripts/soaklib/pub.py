"""The soak's reliable publisher: one persistent-session paho client per tenant (clean_session=False,
fixed client id), a steady QoS 1 stream at a set rate, bursts on request, and a record of which
messages the broker CONFIRMED (PUBACK) and when. Only confirmed messages count as published; a
message still unconfirmed when the connection drops is re-sent by paho after the reconnect and
counted when its PUBACK arrives.

A tenant on a clustered broker gets every node: its client moves to the next node when its
connection drops or a connect fails (a SIGKILLed node refuses), like mqttd's ``broker.hosts``; its
session, replicated on the cluster, goes with it.

Message identity is (tenant, route, seq): ``route`` is one of ROUTES, ``seq`` counts per route.
"""
from __future__ import annotations

import json
import random
import threading
import time
from collections import deque

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROUTES = ("soak", "soakd", "soakb")          # no dedupe key / dedupe key / batch=True (no key)
DEDUPE_ROUTES = ("soakd",)
DEVICES = 8

Key = tuple[str, int]                        # (route, seq) within one tenant
Endpoint = tuple[str, int]                   # (host, port) of a broker node


class TenantStream:
    """One tenant's client and its books. ``confirmed`` maps (route, seq) -> PUBACK wall time."""

    def __init__(self, tenant: str, endpoints: list[Endpoint], run_id: str, fail_fraction: float,
                 rng: random.Random) -> None:
        self.tenant, self.fail_fraction, self.rng = tenant, fail_fraction, rng
        self.n = 0
        self.seq = dict.fromkeys(ROUTES, 0)
        self.fails: set[Key] = set()
        self.confirmed: dict[Key, float] = {}
        self.pending: dict[int, Key] = {}     # mid -> message, until its PUBACK
        self.early: dict[int, float] = {}     # PUBACKs seen before publish() returned the mid
        self.acks: deque[tuple[int, float]] = deque()
        self.lock = threading.Lock()
        self.connects = 0
        self.refused = 0
        self.endpoints, self.node = endpoints, 0
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-pub-{tenant}-{run_id}",
                        clean_session=False, protocol=paho.MQTTv311)
        c.max_inflight_messages_set(500)
        c.reconnect_delay_set(0.1, 1.0)
        c.on_publish = self._on_publish
        c.on_connect = self._on_connect
        if len(endpoints) > 1:
            c.on_disconnect = self._next_node
            c.on_connect_fail = self._next_node
        c.connect(*endpoints[0], 10)
        self.client = c
        c.loop_start()

    def _on_connect(self, *args) -> None:  # noqa: ANN002
        self.connects += 1

    def _next_node(self, client, *args) -> None:  # noqa: ANN001, ANN002
        """Point paho's next reconnect at the next node. Its public ``host``/``port`` setters refuse
        while a connection is being torn down or retried (which is when this runs, on paho's
        thread, before it reconnects), so the attributes ``reconnect()`` reads are set directly."""
        self.node = (self.node + 1) % len(self.endpoints)
        client._host, client._port = self.endpoints[self.node]

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        # Runs on paho's thread under its own locks: only record, never take ours.
        self.acks.append((mid, time.time()))

    def publish_one(self) -> None:
        route = ROUTES[self.n % len(ROUTES)]
        seq = self.seq[route]
        self.seq[route] = seq + 1
        device = f"{self.tenant}-d{self.n % DEVICES}"
        self.n += 1
        body = {"seq": seq, "tenant": self.tenant, "route": route}
        if self.rng.random() < self.fail_fraction:
            body["fail"] = True
            self.fails.add((route, seq))
        info = self.client.publish(f"{route}/{self.tenant}/{device}", json.dumps(body), qos=1)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:      # paho refused it: never sent, never counted
            self.refused += 1
            return
        with self.lock:
            self.pending[info.mid] = (route, seq)

    def resolve(self) -> None:
        """Match PUBACKs to messages (in arrival order)."""
        with self.lock:
            while self.acks:
                mid, t = self.acks.popleft()
                key = self.pending.pop(mid, None)
                if key is None:
                    self.early[mid] = t
                else:
                    self.confirmed[key] = t
            for mid in [m for m in self.early if m in self.pending]:
                self.confirmed[self.pending.pop(mid)] = self.early.pop(mid)

    def sent_seq(self) -> dict[str, int]:
        """The next seq per route: everything below was handed to paho."""
        return dict(self.seq)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class SoakPublisher:
    """Publishes to every tenant from one thread, each at its own rate (``rates``, msg/s); ``burst``
    multiplies some tenants' rates for a while."""

    def __init__(self, endpoints: dict[str, list[Endpoint]], rates: dict[str, float], fail_fraction: float,
                 seed: int, run_id: str) -> None:
        rng = random.Random(seed)
        self.streams = {t: TenantStream(t, nodes, run_id, fail_fraction, random.Random(rng.random()))
                        for t, nodes in endpoints.items()}
        self.rates = rates
        self._burst_until = 0.0
        self._burst_mult = 1.0
        self._bursting: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-publisher", daemon=True)
        self.lagging = 0.0                     # worst shortfall seen, in messages of one tenant

    def start(self) -> None:
        self._thread.start()

    def burst(self, mult: float, seconds: float, tenants: list[str]) -> None:
        self._bursting = set(tenants)
        self._burst_mult = mult
        self._burst_until = time.monotonic() + seconds

    def _run(self) -> None:
        credit = dict.fromkeys(self.streams, 0.0)
        last = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            bursting = now < self._burst_until
            for t in credit:
                mult = self._burst_mult if bursting and t in self._bursting else 1.0
                credit[t] += self.rates[t] * mult * (now - last)
            last = now
            if max(credit.values()) < 1:
                time.sleep(0.005)
                continue
            # Round-robin, 200 rounds at most, so that one tenant never starves the others in a burst.
            for _ in range(200):
                due = [t for t, c in credit.items() if c >= 1]
                if not due:
                    break
                for t in due:
                    self.streams[t].publish_one()
                    credit[t] -= 1
            self.lagging = max(self.lagging, *credit.values())
            for s in self.streams.values():
                s.resolve()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_confirmed(self, timeout: float) -> int:
        """Wait for every PUBACK; returns how many messages are still unconfirmed."""
        deadline = time.monotonic() + timeout
        while True:
            for s in self.streams.values():
                s.resolve()
            left = sum(len(s.pending) for s in self.streams.values())
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def close(self) -> None:
        for s in self.streams.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing after a failure
                pass
