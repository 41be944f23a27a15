"""Identity is pure: every derived name comes from the project name (and instance)."""
import pytest

from mqttd.errors import InvalidName, UsageError
from mqttd.identity import derive, from_args, resolve_project

ENV = {"MQTTD_RUN_DIR": "/r", "MQTTD_LOG_DIR": "/l"}


def test_every_name_an_instance_owns_is_derived_from_the_project():
    i = derive("bnp", None, ENV, hostname="web1")
    assert str(i.lock_path) == "/r/bnp.pid"
    assert str(i.status_path) == "/r/bnp.status.json"
    assert str(i.log_file) == "/l/bnp/mqttd.log"
    assert i.client_id == "bnp-web1"
    assert i.status_topic == "mqttd/bnp/status"
    assert i.canary_topic == "mqttd/bnp/canary"


def test_an_instance_number_is_appended_to_the_project_part():
    i = derive("bnp", 2, ENV, hostname="web1")
    assert str(i.lock_path) == "/r/bnp-2.pid"
    assert i.client_id == "bnp-2-web1"
    assert str(i.log_dir) == "/l/bnp-2"


def test_defaults_are_run_mqttd_and_var_log_mqttd():
    i = derive("bnp", None, {}, hostname="h")
    assert str(i.lock_path) == "/run/mqttd/bnp.pid"
    assert str(i.log_file) == "/var/log/mqttd/bnp/mqttd.log"


def test_three_projects_never_share_a_lock_client_id_or_log_dir():
    ids = [derive(n, None, ENV, hostname="h") for n in ("youtility4", "django5", "bnp")]
    for attr in ("lock_path", "client_id", "log_dir", "status_path"):
        assert len({getattr(i, attr) for i in ids}) == 3


def test_project_comes_from_flag_then_mqttd_project_then_project_name():
    assert resolve_project("a", {"MQTTD_PROJECT": "b", "PROJECT_NAME": "c"}) == "a"
    assert resolve_project(None, {"MQTTD_PROJECT": "b", "PROJECT_NAME": "c"}) == "b"
    assert resolve_project(None, {"PROJECT_NAME": "c"}) == "c"
    with pytest.raises(UsageError):
        resolve_project(None, {})


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "has space", "Upper", "-lead", "_lead", "a" * 64, "x.y", "é"])
def test_invalid_names_are_refused_with_the_rule(bad):
    with pytest.raises(InvalidName) as err:
        derive(bad)
    assert "^[a-z0-9][a-z0-9_-]{0,62}$" in str(err.value)


def test_instance_comes_from_env_and_must_be_a_number():
    assert from_args("bnp", None, {"MQTTD_INSTANCE": "3"}).instance == 3
    with pytest.raises(UsageError):
        from_args("bnp", "x1", {})
