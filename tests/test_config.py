"""Configuration errors exit 78 and name the file and the key."""
import subprocess
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
    assert c.broker.protocol == "auto" and c.broker.session_expiry == 86400 and c.broker.keepalive == 60


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


# ---- ranges: every number is checked at load, in `check` and `run` alike (exit 78) ----------------
#
# (section, key, lowest, highest): each key is tried just outside (lowest - step, highest + step)
# and just inside (the two bounds themselves: one config with every lowest value, one with every
# highest, which `check` must pass and `run` must connect with). Written out here rather than
# imported, so that the test holds the code to the documented table.

RANGE_TABLE = [
    ("broker", "port", 1, 65535),
    ("broker", "keepalive", 5, 65535),
    ("broker", "receive_maximum", 1, 65535),
    ("broker", "session_expiry", 0, 4294967295),
    ("broker", "reconnect_min", 0.05, 600.0),
    ("broker", "reconnect_max", 0.05, 600.0),
    ("dispatch", "batch_size", 1, 65535),
    ("dispatch", "batch_linger_ms", 0, 60000),
    ("dispatch", "max_backlog", 1, 1_000_000),
    ("dispatch", "max_payload", 0, 268_435_455),
    ("dispatch", "handler_timeout", 0.1, 86400.0),
    ("status", "interval", 0.1, 5.0),
    ("status", "canary_interval", 0.1, 3600.0),
    ("status", "metrics_port", 0, 65535),
    ("status", "gap_settle_s", 1.0, 86400.0),
]
# Values from the bug reports and the float oddities TOML allows.
EXTRA_OUTSIDE = [
    ("broker", "keepalive", 70000),
    ("broker", "receive_maximum", 70000),
    ("broker", "session_expiry", 2**32),
    ("dispatch", "handler_timeout", "nan"),
    ("dispatch", "handler_timeout", "inf"),
    ("status", "interval", "-inf"),
]


def _written(value: float) -> str:
    """A bound as the message (and docs/configuration.md) must write it: 4294967295, 600, 0.05."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _outside() -> list[tuple[str, str, object, str, str]]:
    cases = []
    for section, key, lo, hi in RANGE_TABLE:
        step = 1 if isinstance(lo, int) else 0.01
        cases += [(section, key, round(lo - step, 2), _written(lo), _written(hi)),
                  (section, key, round(hi + step, 2), _written(lo), _written(hi))]
    bounds = {(s, k): (_written(lo), _written(hi)) for s, k, lo, hi in RANGE_TABLE}
    return cases + [(s, k, v, *bounds[s, k]) for s, k, v in EXTRA_OUTSIDE]


_BASE = {
    "broker": {"host": '"127.0.0.1"', "protocol": '"5"', "keepalive": "10", "reconnect_min": "0.2",
               "reconnect_max": "2"},
    "status": {"interval": "0.5", "canary_interval": "1"},
    "dispatch": {},
}


def _full_config(path: Path, port: int, **overrides: dict) -> Path:
    """A complete, valid config for the sample tenant, with ``overrides`` per section."""
    from lab.db import TENANT_DIR

    lines = [f'[django]\nsettings = "tenant_site.settings"\npythonpath = ["{TENANT_DIR}"]\n']
    for section, base in _BASE.items():
        values = {**({"port": str(port)} if section == "broker" else {}), **base,
                  **{k: str(v) for k, v in overrides.get(section, {}).items()}}
        lines.append(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    path.write_text("\n".join(lines))
    return path


def test_every_number_outside_its_range_is_refused_by_check_and_run_naming_the_key(host, broker, sqlite_db,
                                                                                   tmp_path):
    failures = []
    for i, (section, key, outside, lo, hi) in enumerate(_outside()):
        cfg = _full_config(tmp_path / f"out{i}.toml", broker.port, **{section: {key: outside}})
        for command in ("check", "run"):
            extra = ["--timeout", "3"] if command == "check" else []
            try:
                r = host.mqttd(command, "--project", "bnp", "--config", str(cfg), *extra, db=sqlite_db, timeout=15)
            except subprocess.TimeoutExpired:
                failures.append(f"{command} {section}.{key} = {outside}: still running after 15 s")
                continue
            err = r.stderr
            if not (r.returncode == 78 and str(cfg) in err and f"{section}.{key}" in err and f"{lo}-{hi}" in err
                    and "Traceback" not in err and len(err.strip().splitlines()) == 1):
                failures.append(f"{command} {section}.{key} = {outside}: exit {r.returncode}: {err.strip()[-300:]}")
    assert not failures, f"{len(failures)} cases:\n" + "\n".join(failures)


def test_reconnect_min_above_reconnect_max_is_refused(host, sqlite_db, tmp_path):
    from lab.broker import free_port

    cfg = _full_config(tmp_path / "c.toml", free_port(), broker={"reconnect_min": 3, "reconnect_max": 2})
    for command in ("check", "run"):
        r = host.mqttd(command, "--project", "bnp", "--config", str(cfg), db=sqlite_db, timeout=15)
        assert r.returncode == 78, r.stderr
        assert "broker.reconnect_min" in r.stderr and "broker.reconnect_max" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_booleans_are_not_numbers(tmp_path):
    for section, key, _lo, _hi in RANGE_TABLE:
        p = _cfg(tmp_path, f"[{section}]\n{key} = true\n")
        with pytest.raises(ConfigError, match=rf"{section}\.{key}: must be"):
            load(p, {})


@pytest.mark.parametrize("bound", ["lower", "upper"])
def test_every_number_at_the_edge_of_its_range_passes_check_and_runs(host, broker, sqlite_db, tmp_path, bound):
    overrides: dict[str, dict] = {}
    for section, key, lo, hi in RANGE_TABLE:
        if key != "port":                       # the broker's port is the test broker's
            overrides.setdefault(section, {})[key] = lo if bound == "lower" else hi
    cfg = _full_config(tmp_path / f"{bound}.toml", broker.port, **overrides)
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), db=sqlite_db)
    assert r.returncode == 0, r.stdout + r.stderr
    d = host.start("bnp", cfg, sqlite_db)
    d.wait_connected()
    assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("port", [1, 65535])
def test_a_broker_port_at_the_edge_is_accepted(host, sqlite_db, tmp_path, port):
    cfg = _full_config(tmp_path / "c.toml", port)
    assert load(cfg, {}).broker.port == port
    r = host.mqttd("check", "--project", "bnp", "--config", str(cfg), "--timeout", "2", db=sqlite_db)
    assert r.returncode == 1 and f"cannot connect to 127.0.0.1:{port}" in r.stderr, r.stderr


def test_the_configuration_reference_lists_every_key_with_the_range_the_code_enforces():
    """docs/configuration.md is the operator's reference: every key of the code is in it, with the
    range of RANGE_TABLE (which the tests above hold the code to)."""
    import dataclasses
    import re

    from mqttd import config as c

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    sections = {"django": c.DjangoConfig, "broker": c.BrokerConfig, "broker.tls": c.TLSConfig,
                "subscribe": c.Subscription, "dispatch": c.DispatchConfig, "status": c.StatusConfig}
    rows: dict[str, dict[str, str]] = {}
    current = None
    for line in doc.splitlines():
        if line.startswith("## ") or line.startswith("### "):
            m = re.search(r"`\[+([a-z.]+)\]+`", line)
            current = m.group(1) if m else None
        elif current and (m := re.match(r"\| `([a-z_]+)` \|", line)):
            rows.setdefault(current, {})[m.group(1)] = line
    for section, cls in sections.items():
        keys = {f.name for f in dataclasses.fields(cls)} - {"password"}
        if section == "broker":
            keys.add("password_file")
        assert set(rows.get(section, {})) == keys, (section, set(rows.get(section, {})) ^ keys)
    for section, key, lo, hi in RANGE_TABLE:
        assert f"{_written(lo)}-{_written(hi)}" in rows[section][key].replace(",", ""), (section, key)
