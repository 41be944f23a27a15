"""The typed status contract (mqttd/daemon/schema.py): what the daemon writes is what status,
health, recover and /metrics read back, and an older or newer file never breaks a reader."""
import json

from mqttd.daemon import status
from mqttd.daemon.schema import Row, Status

DOCUMENTED_ROW_KEYS = {"project", "instance", "pid", "state", "healthy", "reason", "client_id", "connected", "uptime_s",
                 "last_message_age_s", "rate_1m", "backlog", "dead_letters", "reconnects", "session_gaps",
                 "canary_age_s"}
ACCOUNTS = {"received", "handled", "dead_letters", "duplicates_skipped", "unrouted", "canary", "in_flight"}


def test_a_status_file_round_trips_and_keeps_keys_it_does_not_know(tmp_path):
    # Given a status as the daemon writes it, with a key a newer part added
    st = Status(project="bnp", pid=42, state="running", connected=True, received=7, handled=5, canary=2,
                subscribe_failures=["a/#: not authorized"], extra={"queue_drops": 3})
    path = tmp_path / "bnp.status.json"
    status.write_atomic(path, st)
    # Then the file is flat JSON and reads back equal, the unknown key kept as it was
    data = json.loads(path.read_text())
    assert data["queue_drops"] == 3 and "extra" not in data and data["received"] == 7
    assert status.read(path) == st


def test_an_older_file_and_values_of_the_wrong_type_read_as_defaults(tmp_path):
    path = tmp_path / "old.status.json"
    path.write_text(json.dumps({"project": "bnp", "state": "running", "pid": "not a pid", "backlog": 3,
                                "rate_1m": 2, "db_ok": None}))
    st = status.read(path)
    assert st is not None
    assert (st.pid, st.backlog, st.rate_1m, st.in_flight, st.db_ok) == (None, 3, 2, 0, None)
    path.write_text("[1, 2]")
    assert status.read(path) is None


def test_the_status_json_row_carries_specs_keys_and_the_accounting():
    assert DOCUMENTED_ROW_KEYS | ACCOUNTS <= set(Row.__annotations__)
