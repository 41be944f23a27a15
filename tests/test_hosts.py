"""broker.hosts: the nodes of a clustered broker, tried in turn on every reconnect (docs/configuration.md).

Two private mosquittos stand in for two nodes (not bridged: the failover tests here are about
which node the daemon talks to; a real cluster keeping the session is helper B's test)."""
from pathlib import Path

import pytest
from lab.broker import Broker, free_port
from lab.daemon import write_config
from lab.publish import publish_telemetry
from lab.waits import wait_rows

from mqttd.config import parse
from mqttd.errors import ConfigError


def _hosts_config(path: Path, nodes: list[str], **kwargs) -> Path:  # noqa: ANN003
    """The tests' usual config with ``hosts = [...]`` in place of host/port."""
    cfg = write_config(path, 1, **kwargs)
    text = cfg.read_text().replace('host = "127.0.0.1"\nport = 1\n', f"hosts = {nodes!r}\n".replace("'", '"'))
    cfg.write_text(text)
    return cfg


def test_hosts_parse_into_nodes_and_host_port_still_work():
    b = parse({"broker": {"hosts": ["h1:1883", "h2:1884", "[::1]:1885", "h3"]}}, "/etc/mqttd/x.toml", {}).broker
    assert b.nodes() == (("h1", 1883), ("h2", 1884), ("::1", 1885), ("h3", 1883))
    assert (b.host, b.port) == ("h1", 1883)                  # the first node, for code that wants one
    one = parse({"broker": {"host": "h9", "port": 1999}}, "/etc/mqttd/x.toml", {}).broker
    assert one.nodes() == (("h9", 1999),) and one.hosts == ()


@pytest.mark.parametrize(("broker", "key", "reason"), [
    ({"hosts": ["h1:1883"], "port": 1883}, "broker.hosts", "exclude each other"),
    ({"hosts": ["h1:1883"], "host": "h1"}, "broker.hosts", "exclude each other"),
    ({"hosts": []}, "broker.hosts", "at least one"),
    ({"hosts": ["h1:1883", "h2:0"]}, "broker.hosts[1]", "1-65535"),
    ({"hosts": ["h1:70000"]}, "broker.hosts[0]", "1-65535"),
    ({"hosts": ["h1:x"]}, "broker.hosts[0]", "1-65535"),
    ({"hosts": [1883]}, "broker.hosts[0]", "host:port"),
    ({"hosts": "h1:1883"}, "broker.hosts", "must be list"),
])
def test_bad_hosts_are_config_errors_naming_file_and_key(broker, key, reason):
    with pytest.raises(ConfigError) as err:
        parse({"broker": broker}, "/etc/mqttd/x.toml", {})
    text = str(err.value)
    assert "/etc/mqttd/x.toml" in text and f"{key}:" in text and reason in text, text


def test_a_dead_first_node_is_skipped_and_check_says_so(host, broker, sqlite_db, tmp_path):
    # Given hosts = [a port nobody listens on, the live broker]
    dead = free_port()
    cfg = _hosts_config(tmp_path / "c.toml", [f"127.0.0.1:{dead}", f"127.0.0.1:{broker.port}"])
    # When mqttd check runs, it warns about the dead node and probes the live one
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), "--timeout", "5", db=sqlite_db)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"127.0.0.1:{dead}" in r.stdout and "does not answer" in r.stdout
    assert f"broker 127.0.0.1:{broker.port}" in r.stdout
    # When the daemon starts, it connects to the live node, says which in its status, and works
    d = host.start("bnp", cfg, sqlite_db)
    st = d.wait_connected()
    assert st["broker"] == f"127.0.0.1:{broker.port}"
    publish_telemetry(broker.port, 20)
    wait_rows(sqlite_db, 20)
    assert f"connected to 127.0.0.1:{broker.port}" in d.log()
    assert d.stop() == 0


def test_the_daemon_moves_to_the_next_node_when_its_broker_dies(host, broker, sqlite_db, tmp_path):
    # Given two nodes, both up, and a daemon connected to the first
    b2 = Broker(tmp_path / "broker2").start()
    try:
        cfg = _hosts_config(tmp_path / "c.toml", [f"127.0.0.1:{broker.port}", f"127.0.0.1:{b2.port}"])
        d = host.start("bnp", cfg, sqlite_db)
        assert d.wait_connected()["broker"] == f"127.0.0.1:{broker.port}"
        publish_telemetry(broker.port, 10)
        wait_rows(sqlite_db, 10)
        # When the first node is killed
        broker.kill()
        # Then the daemon reconnects to the second and stores what is published there
        st = d.wait_for(lambda s: s["connected"] and s["broker"] == f"127.0.0.1:{b2.port}", timeout=30,
                        what="connected to the second node")
        assert st["reconnects"] >= 1
        publish_telemetry(b2.port, 10, start=10)
        wait_rows(sqlite_db, 20)
        assert d.stop() == 0
    finally:
        b2.stop()
