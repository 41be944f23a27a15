"""Publish test traffic quickly and confirmed (QoS 1 PUBACKs awaited)."""
from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class Publisher:
    def __init__(self, port: int, client_id: str = "", max_inflight: int = 1000) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        self.client.max_inflight_messages_set(max_inflight)
        self._acked = 0
        self._lock = threading.Lock()
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()

    def _on_publish(self, *args) -> None:  # noqa: ANN002
        with self._lock:
            self._acked += 1

    def send(self, topic: str, payload: bytes | str | dict, qos: int = 1, retain: bool = False,
             properties=None) -> None:  # noqa: ANN001
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def wait_acked(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._acked >= n:
                    return
            time.sleep(0.01)
        raise AssertionError(f"only {self._acked}/{n} publishes confirmed by the broker")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_telemetry(port: int, n: int, devices: int = 2, topic: str = "ble/dev-{k}/telemetry", start: int = 0,
                      **extra) -> None:  # noqa: ANN003
    """Publish ``n`` telemetry messages (seq start..start+n-1) over ``devices`` devices and wait
    until the broker confirmed every one."""
    pub = Publisher(port)
    for i in range(start, start + n):
        pub.send(topic.format(k=i % devices), telemetry(i, **extra))
    pub.wait_acked(n)
    pub.close()


def publish_steadily(port: int, seqs: range, rate: float, acked: list[int], devices: int, inflight: int,
                     confirm_s: float) -> None:
    """QoS 1 telemetry ``seqs`` at ``rate``/s over ``devices`` topics through one broker (or node),
    then wait up to ``confirm_s`` for every PUBACK; ``acked[0]`` counts them as they come (the
    fault tests read it while this runs in a thread)."""
    from lab.waits import wait_until

    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    c.max_inflight_messages_set(inflight)
    c.on_publish = lambda *a: acked.__setitem__(0, acked[0] + 1)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    try:
        t0 = time.monotonic()
        for k, i in enumerate(seqs):
            c.publish(f"ble/dev-{i % devices}/telemetry", json.dumps(telemetry(i)), qos=1)
            delay = t0 + (k + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        wait_until(lambda: acked[0] >= len(seqs), timeout=confirm_s, what="every publish confirmed")
    finally:
        c.disconnect()
        c.loop_stop()


def ble_payload(seq: int, devices: int = 50) -> bytes:
    """The benchmark's ~100-byte BLE telemetry JSON (docs/benchmarks.md)."""
    dev = f"ble-{seq % devices + 1:04d}"
    return json.dumps({"device": dev, "rssi": -40 - seq % 50, "temp": 15 + (seq % 100) / 10,
                       "hum": 40 + (seq % 300) / 10, "batt": 2.5 + (seq % 70) / 100, "seq": seq,
                       "ts": 1732000000.0 + seq / 1000}, separators=(",", ":")).encode()


def telemetry(seq: int, **extra) -> dict:  # noqa: ANN003
    return {"seq": seq, "rssi": -50 - seq % 40, "temp": 20.0 + (seq % 10) / 10, **extra}


def fill(port: int, n: int, topic_for, payload_for, timeout: float = 300.0) -> None:  # noqa: ANN001
    """Queue n QoS 1 messages at the broker as fast as it confirms them (at most 20k unconfirmed)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    c.max_inflight_messages_set(2000)
    acked = [0]
    lock = threading.Lock()

    def on_pub(*a) -> None:  # noqa: ANN002
        with lock:
            acked[0] += 1

    c.on_publish = on_pub
    c.connect("127.0.0.1", port, 60)
    c.loop_start()
    try:
        for i in range(n):
            c.publish(topic_for(i), payload_for(i), qos=1)
            if i % 5000 == 4999:
                while acked[0] < i - 20000:
                    time.sleep(0.005)
        deadline = time.monotonic() + timeout
        while acked[0] < n and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        c.disconnect()
        c.loop_stop()
    if acked[0] < n:
        raise AssertionError(f"broker confirmed only {acked[0]}/{n}")
