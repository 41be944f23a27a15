"""Prometheus as its users run it: the real `promtool` checks a real daemon's /metrics, the shipped
alert rules and their unit tests, and the Grafana dashboard's queries (Debian's `prometheus`
package, installed by scripts/setup when root)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from lab.daemon import write_config
from lab.publish import publish_telemetry
from lab.waits import wait_rows

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "mqttd-alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "mqttd-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "mqttd-dashboard.json"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install "
                                    "prometheus; scripts/setup does it when run as root)")


def promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, cwd=cwd, timeout=120)


def _rules() -> dict[str, str]:
    """Alert name -> the text of its rule (the test venv has no YAML parser; promtool has one)."""
    text = "\n".join(line for line in RULES.read_text().splitlines() if not line.lstrip().startswith("#"))
    return dict(re.findall(r"^ *- alert: (\S+)\n(.*?)(?=^ *- alert: |\Z)", text, re.M | re.S))


def _dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:mqttd|process)_[a-z0-9_]+)", expr)) - {"mqttd_instance"}   # a label


@needs_promtool
def test_a_real_scrape_passes_promtool_and_leaves_prometheus_its_own_labels(host, broker, sqlite_db, tmp_path):
    d = host.start("bnp", write_config(tmp_path / "c.toml", broker.port), sqlite_db,
                   "--instance", "2", "--metrics-port", "0")
    st = d.wait_for(lambda s: s.get("connected") and s.get("canary_at") and s.get("metrics_port"), what="canary")
    publish_telemetry(broker.port, 30, devices=3)
    wait_rows(sqlite_db, 30)
    st = d.wait_for(lambda s: s["acked"] >= 30 and s.get("ack_latency", {}).get("count", 0) >= 2, what="acks")
    with urllib.request.urlopen(f"http://127.0.0.1:{st['metrics_port']}/metrics", timeout=5) as r:
        text = r.read()

    check = promtool("check", "metrics", stdin=text)

    assert (check.returncode, check.stdout + check.stderr) == (0, b""), text.decode()
    samples = [line for line in text.decode().splitlines() if line.startswith("mqttd_")]
    assert samples
    for line in samples:          # never `instance` or `job`: Prometheus attaches those itself
        labels = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', line.split("}")[0])
        assert "instance" not in labels and "job" not in labels, line
        assert {"project", "mqttd_instance"} <= set(labels), line
    assert 'mqttd_messages_handled_total{mqttd_instance="2",project="bnp"} 30.0' in samples
    # Ack latency is a real histogram: cumulative buckets, +Inf = count, a sum
    buckets = [(m[1], float(m[2])) for m in (re.match(r'mqttd_ack_latency_seconds_bucket\{le="([^"]+)",.*\} (\S+)', s)
                                              for s in samples) if m]
    assert [le for le, _ in buckets][-1] == "+Inf" and len(buckets) >= 10
    counts = [n for _, n in buckets]
    assert counts == sorted(counts) and counts[-1] >= 2
    assert f'mqttd_ack_latency_seconds_count{{mqttd_instance="2",project="bnp"}} {counts[-1]}' in samples
    assert any(s.startswith("mqttd_ack_latency_seconds_sum{") for s in samples)
    assert not any("quantile" in s for s in samples)
    # Every metric the alert rules and the dashboard query is one the daemon exports
    exported = {re.split(r"[{ ]", line)[0] for line in text.decode().splitlines() if not line.startswith("#")}
    wanted = set().union(*map(_metric_names, _rules().values()), *map(_metric_names, _dashboard_queries()))
    assert wanted and wanted <= exported, sorted(wanted - exported)
    assert d.stop() == 0


@needs_promtool
def test_the_alert_rules_pass_promtool_check_rules():
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert f"SUCCESS: {len(_rules())} rules found".encode() in r.stdout, r.stdout


@needs_promtool
def test_the_alert_rules_pass_their_promtool_unit_tests():
    r = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert b"SUCCESS" in r.stdout


def test_every_alert_has_a_unit_test_that_fires_it_and_humanized_runbook_text():
    alerts = _rules()
    fired = set(re.findall(r"alertname: (\S+)\n *exp_alerts:\n *- exp_labels:", RULES_TEST.read_text()))
    assert set(alerts) <= fired, f"alerts without a firing unit test: {sorted(set(alerts) - fired)}"
    assert {"MqttdDeadLettersRising", "MqttdUnhealthy", "MqttdInstanceGone", "MqttdSessionGap",
            "MqttdBacklogHigh", "MqttdBacklogStuck", "MqttdPublisherGaps"} <= set(alerts)
    for name, rule in alerts.items():
        assert re.search(r"labels: \{severity: (critical|warning)\}", rule), name
        summary = re.search(r"summary: (.*)", rule)
        description = re.search(r"description: >-\n(.*)", rule, re.S)
        assert summary and description, name
        assert "{{ $labels.project }}" in summary[1], name
        # a raw $value prints 187.34987; every use goes through humanize*, or printf
        assert not re.search(r"\{\{\s*\$value\s*\}\}", rule), name
        assert len(description[1].split()) > 20, f"{name}: the description says what to do"


@needs_promtool
def test_the_dashboard_queries_are_valid_promql(tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "mqttd-fleet"
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "project"}
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for what in ("health", "stored per second", "backlog", "dead letters", "ack latency", "reconnects"):
        assert what in titles, what
    exprs = _dashboard_queries()
    assert any("histogram_quantile(0.99" in e and "mqttd_ack_latency_seconds_bucket" in e for e in exprs)
    # promtool parses PromQL in rule files: one recording rule per query, Grafana variables filled in
    rules = [{"record": f"dashboard:query_{i}",
              "expr": e.replace("$__rate_interval", "5m").replace("$project", "bnp|youtility4")}
             for i, e in enumerate(exprs) if not e.startswith("label_values(")]
    f = tmp_path / "dashboard-queries.yml"
    f.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))     # JSON is YAML
    r = promtool("check", "rules", str(f))
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
