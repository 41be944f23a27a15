"""The model-checked message path (issue 14): scripts/modelcheck on SQLite and on PostgreSQL.

Hypothesis drives the real Router / Deduper / BatchRunner / DeadLetterSink / Dispatcher against a
real database with handler misbehaviour, outages, kills and hangs (scripts/lab/model_harness.py);
Django is set up once per process, so each engine runs in its own process. A failure prints each
kind of violation with its minimal falsifying example.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lab.db import pg_available

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("MODELCHECK_EXAMPLES", "300"))


def _modelcheck(engine: str) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "modelcheck"), "--engine", engine, "--examples", str(EXAMPLES)]
    seed = os.environ.get("MODELCHECK_SEED")
    if seed:
        cmd += ["--seed", seed]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    print(out)
    assert "examples" in out and proc.returncode in (0, 1), out[-4000:]
    assert proc.returncode == 0, "the model found violations of the delivery promise (docs/delivery.md):\n" + out[-12000:]


def test_model_path_sqlite() -> None:
    _modelcheck("sqlite")


@pytest.mark.postgres
def test_model_path_postgres() -> None:
    if not pg_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL on 127.0.0.1:5432 is required in CI")
        pytest.skip("PostgreSQL on 127.0.0.1:5432 not reachable")
    _modelcheck("postgres")
