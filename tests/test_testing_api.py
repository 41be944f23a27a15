"""mqttd.testing as a tenant uses it: the sample tenant's own Django TestCase (tests/tenant/sensors/tests.py)
runs messages through the real router, dedupe, batch runner and dead-letter logic, without a broker.
Beside it, tests/tenant/sensors/tests_outcomes.py: mqttd's own fast tests of how each message settles."""
import os
import re
import subprocess
import sys

import pytest
from lab.db import PG, TENANT_DIR, pg_available


def _manage_test(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", "test", "sensors", "-v2"], cwd=TENANT_DIR,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_the_tenants_own_test_suite_runs_its_handlers_through_mqttd_testing(engine, tmp_path):
    if engine == "postgres" and not pg_available():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 not reachable")
    # Given the tenant's TestCases (handled, dead letter with its error, duplicate skipped, a batch)
    name = str(tmp_path / "t.sqlite3") if engine == "sqlite" else f"mqttd_testing_{os.getpid()}"
    # When the tenant runs `manage.py test` (Django makes and drops its own test database)
    r = _manage_test({"TENANT_DB_ENGINE": engine, "TENANT_DB_NAME": name, "TENANT_DB_HOST": PG["host"]})
    # Then every one of them ran and passed
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    ran = re.search(r"Ran (\d+) tests", out)
    assert ran and int(ran.group(1)) == 13, out[-2000:]
    for name in ("test_a_handler_that_raises_gives_a_dead_letter_with_its_error",
                 "test_a_redelivery_with_a_known_dedupe_key_is_skipped",
                 "test_one_bad_message_in_a_batch_does_not_roll_back_its_neighbours",
                 "test_a_duplicate_whose_first_copy_failed_in_the_same_batch_runs_after_all",
                 "test_a_batch_of_every_kind_settles_each_message_once"):
        assert re.search(rf"{name} .*\.\.\. .*?ok", out, re.S), name

