"""Tracing (docs/operations.md, the `otel` extra): a W3C traceparent on a message continues its trace with
one span per handler call, in the tenant's own tests and in the running daemon."""
import json
import os
import subprocess
import sys

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from lab.daemon import write_config
from lab.db import TENANT_DIR
from lab.waits import wait_rows, wait_until

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_the_tenants_tests_see_a_span_per_handler_call_in_the_in_memory_exporter(tmp_path):
    # Given the sample tenant's tracing tests (OpenTelemetry SDK, in-memory exporter, mqttd.testing)
    r = subprocess.run([sys.executable, "manage.py", "test", "sensors.tracing_tests", "-v2"], cwd=TENANT_DIR,
                       env={**os.environ, "TENANT_DB_NAME": str(tmp_path / "t.sqlite3")},
                       capture_output=True, text=True, timeout=120)
    # Then all four pass: parent kept, error status on a raise, a new trace without one, a batch linked
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Ran 4 tests" in out, out[-2000:]


def test_a_traced_publish_continues_its_trace_in_the_running_daemon(host, broker, sqlite_db, tmp_path):
    # Given a tenant whose settings set up an OpenTelemetry tracer provider
    spans_file = tmp_path / "spans.jsonl"
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db,
                   env={"TENANT_OTEL_SPANS": str(spans_file)})
    d.wait_connected()
    # When a service publishes a reading with the W3C traceparent of its own span (MQTT 5)
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("traceparent", f"00-{TRACE}-{PARENT}-01")]
    c.publish("ble/d7/telemetry", json.dumps({"seq": 1, "rssi": -61}), qos=1, properties=props).wait_for_publish(10)
    c.publish("ble/d7/telemetry", json.dumps({"seq": 2, "rssi": -62}), qos=1).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    wait_rows(sqlite_db, 2)

    # Then the daemon's handler call is a consumer span in that trace, child of the publisher's span
    def spans() -> list[dict]:
        if not spans_file.exists():
            return []
        return [s for s in map(json.loads, spans_file.read_text().splitlines())
                if s["name"] == "mqttd sensors.mqtt_handlers.save_reading"]
    wait_until(lambda: len(spans()) >= 2, what="two handler spans")
    traced = [s for s in spans() if s["trace_id"] == TRACE]
    assert len(traced) == 1, spans()
    [span] = traced
    assert span["kind"] == "CONSUMER" and span["parent_span_id"] == PARENT and span["status"] != "ERROR"
    assert span["attributes"]["messaging.destination.name"] == "ble/d7/telemetry"
    assert span["attributes"]["mqttd.outcome"] == "handled"
    # and the untraced message got a span of its own, in a new trace
    assert [s["parent_span_id"] for s in spans() if s["trace_id"] != TRACE] == [None]
    assert d.stop() == 0
