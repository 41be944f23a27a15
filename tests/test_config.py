"""Configuration errors exit 78 and name the file and the key."""
from pathlib import Path

import pytest

from mqttd.config import load
from mqttd.errors import ConfigError


def _cfg(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_a_minimal_config_gets_safe_defaults(tmp_path):
    c = load(_cfg(tmp_path, '[django]\nsettings = "x.settings"\n'), {})
    assert c.broker.protocol == "5" and c.broker.session_expiry == 86400 and c.broker.keepalive == 60


def test_password_comes_from_a_file_and_is_never_in_the_repr(tmp_path):
    secret = tmp_path / "s"
    secret.write_text("hunter2\n")
    c = load(_cfg(tmp_path, f'[broker]\nusername = "u"\npassword_file = "{secret}"\n'), {})
    assert c.broker.password == "hunter2"
    assert "hunter2" not in repr(c)


def test_password_from_the_environment(tmp_path):
    c = load(_cfg(tmp_path, "[broker]\n"), {"MQTTD_BROKER_PASSWORD": "pw"})
    assert c.broker.password == "pw"


@pytest.mark.parametrize("text,key", [
    ("[broker]\nport = \"x\"\n", "broker.port"),
    ("[broker]\nbogus = 1\n", "broker.bogus"),
    ("[broker]\npassword = \"inline\"\n", "broker.password"),
    ("[broker]\nprotocol = \"4\"\n", "broker.protocol"),
    ("[[subscribe]]\ntopic = \"a\"\n", "subscribe[0].handler"),
    ("[dispatch]\nbatch_size = 0\n", "dispatch.batch_size"),
])
def test_bad_values_name_file_and_key(tmp_path, text, key):
    p = _cfg(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(p, {})
    assert str(p) in str(err.value) and key in str(err.value)


def test_unreadable_password_file_names_the_key(tmp_path):
    p = _cfg(tmp_path, f'[broker]\npassword_file = "{tmp_path}/missing"\n')
    with pytest.raises(ConfigError, match="broker.password_file"):
        load(p, {})


def test_cli_config_errors_exit_78_with_one_line(host, tmp_path):
    cases = {
        "missing": tmp_path / "nope.toml",
        "bad toml": _cfg(tmp_path, "[broker\n"),
        "unknown key": _cfg(tmp_path, "[broker]\nprot = 1\n"),
        "wrong type": _cfg(tmp_path, "[broker]\nkeepalive = \"60\"\n"),
    }
    for what, path in cases.items():
        r = host.mqttd("run", "--project", "bnp", "--config", str(path))
        assert r.returncode == 78, (what, r.stderr)
        assert str(path) in r.stderr, (what, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (what, r.stderr)
        assert "Traceback" not in r.stderr


def test_config_path_defaults_to_the_env_then_etc(host, tmp_path):
    r = host.mqttd("run", "--project", "nosuchproject")
    assert r.returncode == 78 and "/etc/mqttd/nosuchproject.toml" in r.stderr
    r = host.mqttd("run", "--project", "bnp", env={"MQTTD_CONFIG": str(tmp_path / "x.toml")})
    assert r.returncode == 78 and str(tmp_path / "x.toml") in r.stderr
