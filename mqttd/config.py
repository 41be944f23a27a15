"""The TOML configuration, validated once into frozen objects (SPEC §4).

Every error names the file, the key and the reason, and exits 78. Secrets come only from
``broker.password_file`` or ``MQTTD_BROKER_PASSWORD``; the password is kept out of every repr.
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .identity import Identity

DEFAULT_CONFIG_DIR = "/etc/mqttd"


@dataclass(frozen=True)
class TLSConfig:
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False          # skip host-name verification (never the chain); off by default


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"
    keepalive: int = 60
    session_expiry: int = 86400
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str | None = None
    tls: TLSConfig | None = None
    shared_group: str | None = None
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    receive_maximum: int | None = None   # None: twice the batch size


@dataclass(frozen=True)
class DjangoConfig:
    settings: str | None = None
    pythonpath: tuple[str, ...] = ()


@dataclass(frozen=True)
class Subscription:
    topic: str
    handler: str
    qos: int = 1
    batch: bool = False


@dataclass(frozen=True)
class DispatchConfig:
    batch_size: int = 500
    batch_linger_ms: int = 10        # the flush timer: how long a short batch waits to fill
    max_backlog: int = 5000          # messages held in memory before the socket is paused
    dedupe_property: str | None = None  # MQTT 5 user property holding a dedupe key
    max_payload: int = 0             # bytes; larger payloads become dead letters (0: no limit)
    handler_timeout: float = 60.0    # seconds one handler call may run before it is treated as hung


@dataclass(frozen=True)
class StatusConfig:
    interval: float = 2.0
    canary_interval: float = 10.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


@dataclass(frozen=True)
class Config:
    path: Path | None
    django: DjangoConfig = DjangoConfig()
    broker: BrokerConfig = BrokerConfig()
    subscribe: tuple[Subscription, ...] = ()
    dispatch: DispatchConfig = DispatchConfig()
    status: StatusConfig = StatusConfig()


def config_path(arg: str | None, identity: Identity, env: Mapping[str, str]) -> Path:
    """--config, else MQTTD_CONFIG, else /etc/mqttd/PROJECT.toml."""
    chosen = arg or env.get("MQTTD_CONFIG")
    return Path(chosen) if chosen else Path(DEFAULT_CONFIG_DIR) / f"{identity.project}.toml"


class _Reader:
    """Takes typed values out of one TOML table, naming file and key in every error."""

    def __init__(self, file: str, prefix: str, table: Any) -> None:
        self.file, self.prefix = file, prefix
        if not isinstance(table, dict):
            raise ConfigError("must be a table", file=file, key=prefix)
        self.table = dict(table)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(reason, file=self.file, key=self.key(name))

    def take(self, name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
        if name not in self.table:
            return default
        value = self.table.pop(name)
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            want = " or ".join(k.__name__ for k in kinds)
            raise self.error(name, f"must be {want}, not {type(value).__name__} {value!r}")
        return value

    def positive(self, name: str, kinds: type | tuple[type, ...], default: Any, minimum: float = 1) -> Any:
        value = self.take(name, kinds, default)
        if value is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {value}")
        return value

    def done(self) -> None:
        if self.table:
            name = sorted(self.table)[0]
            hint = ""
            if name == "password":
                hint = " (put the password in password_file or MQTTD_BROKER_PASSWORD, never in this file)"
            raise self.error(name, f"unknown key{hint}")


def _read_password(broker: _Reader, env: Mapping[str, str]) -> str | None:
    path = broker.take("password_file", str)
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise broker.error("password_file", f"cannot read {path}: {exc.strerror}") from None
    return env.get("MQTTD_BROKER_PASSWORD") or None


def _broker(r: _Reader, env: Mapping[str, str]) -> BrokerConfig:
    protocol = str(r.take("protocol", (str, int, float), "5"))
    if protocol not in ("5", "3.1.1", "311"):
        raise r.error("protocol", f'must be "5" or "3.1.1", not {protocol!r}')
    tls_table = r.take("tls", dict)
    tls = None
    if tls_table is not None:
        t = _Reader(r.file, r.key("tls"), tls_table)
        tls = TLSConfig(t.take("ca_certs", str), t.take("certfile", str), t.take("keyfile", str),
                        t.take("insecure", bool, False))
        t.done()
        for name in ("ca_certs", "certfile", "keyfile"):
            value = getattr(tls, name)
            if value and not os.access(value, os.R_OK):
                raise ConfigError(f"cannot read {value}", file=r.file, key=f"{r.key('tls')}.{name}")
    group = r.take("shared_group", str)
    if group is not None and (not group or any(c in group for c in "/+#")):
        raise r.error("shared_group", "must be a non-empty name without '/', '+' or '#'")
    cfg = BrokerConfig(
        host=r.take("host", str, "127.0.0.1"),
        port=r.positive("port", int, 8883 if tls else 1883),
        protocol="3.1.1" if protocol == "311" else protocol,
        keepalive=r.positive("keepalive", int, 60, minimum=5),
        session_expiry=r.positive("session_expiry", int, 86400),
        username=r.take("username", str),
        password=_read_password(r, env),
        client_id=r.take("client_id", str),
        tls=tls,
        shared_group=group,
        reconnect_min=r.positive("reconnect_min", (int, float), 1.0, minimum=0.05),
        reconnect_max=r.positive("reconnect_max", (int, float), 60.0, minimum=0.05),
        receive_maximum=r.positive("receive_maximum", int, None),
    )
    if cfg.port > 65535:
        raise r.error("port", f"must be at most 65535, not {cfg.port}")
    if cfg.client_id is not None and not (0 < len(cfg.client_id) <= 128):
        raise r.error("client_id", "must be 1-128 characters")
    r.done()
    return cfg


def parse_broker(table: Mapping[str, Any], file: str, key: str, env: Mapping[str, str]) -> BrokerConfig:
    """Validate a broker table found elsewhere (e.g. Django's settings.MQTTD_PUBLISHER)."""
    return _broker(_Reader(file, key, table), env)


def _subscription(file: str, index: int, table: Any) -> Subscription:
    r = _Reader(file, f"subscribe[{index}]", table)
    topic, handler = r.take("topic", str), r.take("handler", str)
    if not topic:
        raise r.error("topic", "is required")
    if not handler:
        raise r.error("handler", 'is required (a dotted path, or "mqttd.inbox")')
    qos = r.take("qos", int, 1)
    if qos not in (0, 1, 2):
        raise r.error("qos", f"must be 0, 1 or 2, not {qos}")
    sub = Subscription(topic=topic, handler=handler, qos=qos, batch=r.take("batch", bool, False))
    r.done()
    return sub


def parse(data: Mapping[str, Any], file: str, env: Mapping[str, str]) -> Config:
    """Validate an already-parsed TOML document."""
    top = _Reader(file, "", data)
    dj = _Reader(file, "django", top.take("django", dict, {}))
    pythonpath = dj.take("pythonpath", (list, str), [])
    if isinstance(pythonpath, str):
        pythonpath = [pythonpath]
    if not all(isinstance(p, str) for p in pythonpath):
        raise dj.error("pythonpath", "must be a list of directory names")
    django_cfg = DjangoConfig(settings=dj.take("settings", str), pythonpath=tuple(pythonpath))
    dj.done()
    broker = _broker(_Reader(file, "broker", top.take("broker", dict, {})), env)
    subs = top.take("subscribe", list, [])
    subscribe = tuple(_subscription(file, i, t) for i, t in enumerate(subs))
    d = _Reader(file, "dispatch", top.take("dispatch", dict, {}))
    dispatch = DispatchConfig(
        batch_size=d.positive("batch_size", int, 500),
        batch_linger_ms=d.positive("batch_linger_ms", int, 10, minimum=0),
        max_backlog=d.positive("max_backlog", int, 5000),
        dedupe_property=d.take("dedupe_property", str),
        max_payload=d.positive("max_payload", int, 0, minimum=0),
        handler_timeout=d.positive("handler_timeout", (int, float), 60.0, minimum=0.1),
    )
    d.done()
    s = _Reader(file, "status", top.take("status", dict, {}))
    status = StatusConfig(
        interval=s.positive("interval", (int, float), 2.0, minimum=0.1),
        canary_interval=s.positive("canary_interval", (int, float), 10.0, minimum=0.1),
        metrics_port=s.positive("metrics_port", int, None, minimum=0),
        metrics_host=s.take("metrics_host", str, "127.0.0.1"),
    )
    s.done()
    top.done()
    return Config(path=Path(file), django=django_cfg, broker=broker, subscribe=subscribe,
                  dispatch=dispatch, status=status)


def load(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the file at ``path``; every failure is a ConfigError (exit 78)."""
    env = os.environ if env is None else env
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from None
    return parse(data, str(path), env)
