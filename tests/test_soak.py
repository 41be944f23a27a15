"""The chaos soak, short: three tenants under a real supervisord, a steady QoS 1 stream, and a
daemon SIGKILL, a broker restart, a broker SIGKILL, pg_terminate_backend and a burst injected
while it runs. Nothing the broker confirmed may be lost (issue 7; docs/delivery.md)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lab.db import pg_available

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak"


def test_short_soak_loses_nothing_the_promise_covers(tmp_path: Path):
    if not pg_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL on 127.0.0.1:5432 is required in CI")
        pytest.skip("PostgreSQL on 127.0.0.1:5432 not reachable")
    results = tmp_path / "soak.json"
    # Given three tenants and a short schedule of faults, when the soak runs
    proc = subprocess.Popen([sys.executable, str(SOAK), "--short", "--json", str(results)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)          # the soak tears down what it started, then exits
        out, _ = proc.communicate(timeout=90)
        pytest.fail(f"soak did not finish within 150 s:\n{out[-5000:]}")

    # then it passes, and its own account agrees
    assert proc.returncode == 0, out[-6000:]
    data = json.loads(results.read_text())
    assert data["passed"], data["failures"]
    by_kind = {k["kind"]: k for k in data["faults_by_kind"]}
    assert {"daemon_kill", "broker_restart", "broker_kill", "pg_terminate", "burst"} <= set(by_kind), by_kind
    for kind, row in by_kind.items():
        assert row["lost"] == 0, (kind, row)               # lost* of a broker SIGKILL is counted apart
        assert row["dup_key"] == 0, (kind, row)
        assert row["not_recovered"] == 0, (kind, row)
    for t in data["tenants"]:
        assert t["published"] > 1000, t                   # the stream really ran under every fault
        assert t["lost_covered"] == 0 and t["dup_key"] == 0, t
        assert t["dl_got"] == t["dl_expected"] > 0, t      # every raising handler became a dead letter
        assert t["published"] == t["stored"] + t["dl_got"] + t["lost_outside"] - t["stored_unconfirmed"], t
    # and every tenant's status rows, read all run long and at the end, added up (docs/operations.md)
    assert data["accounts"]["not_adding_up"] == [], data["accounts"]
    assert all(row[1] >= 3 for row in data["accounts"]["rows"]), data["accounts"]["rows"]
