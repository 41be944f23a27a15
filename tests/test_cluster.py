"""Cluster failover (issue 15, item 5; docs/brokers.md "A clustered broker"): `broker.hosts` on
real clustered engines whose sessions are replicated: a 3-node NATS 2.9 cluster (JetStream, the
MQTT gateway on every node, session streams and consumers on all three) and a 3-node RabbitMQ
3.10 cluster (``mqtt.durable_queue_type = quorum``). mqttd connected to one node; that node
SIGKILLed mid-stream. mqttd moves to another node, its session and queued messages are there,
nothing is lost."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from lab.clusters import NatsCluster, RabbitCluster
from lab.daemon import write_config
from lab.publish import publish_steadily
from lab.waits import wait_rows, wait_until

CI = bool(os.environ.get("MQTTD_CI") or os.environ.get("CI"))


def _hosts_config(path: Path, hosts: list[str]) -> Path:
    cfg = write_config(path, 1, protocol="auto")
    cfg.write_text(cfg.read_text().replace('host = "127.0.0.1"\nport = 1\n',
                                           "hosts = [" + ", ".join(f'"{h}"' for h in hosts) + "]\n"))
    return cfg


@pytest.fixture(params=["nats", "rabbitmq"])
def cluster(request, tmp_path):
    kind = NatsCluster if request.param == "nats" else RabbitCluster
    try:
        c = kind(tmp_path / "cluster").start()
    except RuntimeError as exc:
        if CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield c
    c.stop()


@pytest.mark.slow
def test_killing_the_node_mqttd_is_on_moves_it_to_another_with_its_session_and_loses_nothing(
        cluster, host, sqlite_db, tmp_path):
    # Given mqttd with hosts = the three nodes (it connects to the first) and a session there
    d = host.start("clu", _hosts_config(tmp_path / "c.toml", cluster.hosts()), sqlite_db)
    d.wait_connected(timeout=40)
    d.wait_for(lambda s: s.get("canary_at"), timeout=30, what="the canary through the session")
    # when 1,500 messages flow in at 150/s through a node mqttd is not on
    publisher_node = (cluster.hosts().index(d.status()["broker"]) + 2) % 3
    n, acked = 1500, [0]
    pub = threading.Thread(target=publish_steadily, args=(cluster.mqtt_ports[publisher_node], range(n), 150, acked),
                           kwargs={"devices": 3, "inflight": 200, "confirm_s": 90})
    t0 = time.monotonic()
    pub.start()
    wait_until(lambda: sqlite_db.scalar("select count(*) from sensors_reading") >= 300, timeout=60,
               what="300 stored", interval=0.05)
    # and the node mqttd is connected to now is SIGKILLed mid-stream
    first = d.status()["broker"]
    victim = cluster.hosts().index(first)
    assert victim != publisher_node, "mqttd moved to the publisher's node before the kill"
    cluster.kill_node(victim)
    killed_at = time.monotonic()
    # then mqttd moves to another node
    st = d.wait_for(lambda s: s.get("connected") and s.get("broker") != first, timeout=60, what="another node")
    moved_after = time.monotonic() - killed_at
    pub.join(120)
    # and every message is stored: the queued ones came with the session (duplicates allowed)
    wait_rows(sqlite_db, n, what="count(distinct seq)", timeout=90)
    total = sqlite_db.scalar("select count(*) from sensors_reading")
    print(f"\n{type(cluster).__name__} failover: moved to {st['broker']} {moved_after:.1f} s after the kill; "
          f"{n} of {n} stored, {total - n} duplicates, {time.monotonic() - t0:.1f} s in all")
    assert acked[0] >= n
    assert d.stop() == 0
