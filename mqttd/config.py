"""The TOML configuration, validated once into frozen objects (docs/configuration.md).

Every error names the file, the key and the reason, and exits 78. Secrets come only from
``broker.password_file`` or ``MQTTD_BROKER_PASSWORD``; the password is kept out of every repr.
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# BrokerConfig, TLSConfig and parse_broker live in config_broker, RANGES in config_ranges; they are
# re-exported (``X as X``) because the daemon, the publisher, the tools and the tests import them
# from here, the module that is the configuration's one entry point.
from mqttd.config_broker import BrokerConfig as BrokerConfig
from mqttd.config_broker import TLSConfig as TLSConfig
from mqttd.config_broker import parse_broker as parse_broker
from mqttd.config_broker import read_broker
from mqttd.config_ranges import RANGES as RANGES
from mqttd.config_ranges import Reader
from mqttd.errors import ConfigError
from mqttd.identity import Identity

DEFAULT_CONFIG_DIR = "/etc/mqttd"


@dataclass(frozen=True)
class DjangoConfig:
    settings: str | None = None
    pythonpath: tuple[str, ...] = ()


@dataclass(frozen=True)
class Subscription:
    topic: str
    handler: str | None = None        # a dotted path or "mqttd.inbox"; or, instead, a model:
    qos: int = 1
    batch: bool = False
    model: str | None = None          # "app_label.Model": a model route (docs/handlers.md), no handler code
    fields: tuple[tuple[str, str], ...] = ()   # (model field, value spec): "{param}", "$.a.b", "$topic", ...
    dedupe: str | None = None         # a value spec giving the exactly-once key, e.g. "$.id"


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
    gap_settle_s: float = 60.0      # mqttd.ingest.gaps: how long a hole may wait for a late message


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


def _subscription(file: str, index: int, table: Any) -> Subscription:
    r = Reader(file, f"subscribe[{index}]", table)
    topic, handler, model = r.take("topic", str), r.take("handler", str), r.take("model", str)
    if not topic:
        raise r.error("topic", "is required")
    if handler is not None and model is not None:
        raise r.error("model", "and handler exclude each other: a model route stores rows without handler code")
    if not handler and not model:
        raise r.error("handler", 'is required (a dotted path, or "mqttd.inbox"), or model and fields')
    fields = r.take("fields", dict)
    if model is not None and not fields:
        raise r.error("fields", 'is required with model: { field = "{param}" | "$.json.path" | "$topic" | '
                                '"$payload" | "$received_at", ... }')
    if fields is not None and model is None:
        raise r.error("fields", "belongs to a model route (model = \"app_label.Model\")")
    for name, spec in (fields or {}).items():
        if not isinstance(spec, str):
            raise r.error(f"fields.{name}", f"must be str (a value spec), not {type(spec).__name__} {spec!r}")
    qos = r.number("qos", int, 1, "subscribe")
    sub = Subscription(topic=topic, handler=handler, qos=qos, batch=r.take("batch", bool, False), model=model,
                       fields=tuple((fields or {}).items()), dedupe=r.take("dedupe", str))
    r.done()
    return sub


def parse(data: Mapping[str, Any], file: str, env: Mapping[str, str]) -> Config:
    """Validate an already-parsed TOML document."""
    top = Reader(file, "", data)
    dj = Reader(file, "django", top.take("django", dict, {}))
    pythonpath = dj.take("pythonpath", (list, str), [])
    if isinstance(pythonpath, str):
        pythonpath = [pythonpath]
    if not all(isinstance(p, str) for p in pythonpath):
        raise dj.error("pythonpath", "must be a list of directory names")
    django_cfg = DjangoConfig(settings=dj.take("settings", str), pythonpath=tuple(pythonpath))
    dj.done()
    # A dedupe key carried in an MQTT 5 user property needs MQTT 5: such a project defaults to "5",
    # never to "auto" (a fall back to 3.1.1 would silently stop every dedupe).
    raw_dispatch = data.get("dispatch")
    keyed = isinstance(raw_dispatch, Mapping) and raw_dispatch.get("dedupe_property") is not None
    broker = read_broker(Reader(file, "broker", top.take("broker", dict, {})), env, "5" if keyed else "auto")
    subs = top.take("subscribe", list, [])
    subscribe = tuple(_subscription(file, i, t) for i, t in enumerate(subs))
    d = Reader(file, "dispatch", top.take("dispatch", dict, {}))
    dispatch = DispatchConfig(
        batch_size=d.number("batch_size", int, 500),
        batch_linger_ms=d.number("batch_linger_ms", int, 10),
        max_backlog=d.number("max_backlog", int, 5000),
        dedupe_property=d.take("dedupe_property", str),
        max_payload=d.number("max_payload", int, 0),
        handler_timeout=d.number("handler_timeout", (int, float), 60.0),
    )
    d.done()
    if dispatch.dedupe_property is not None and broker.protocol != "5":
        raise ConfigError(f'must be "5" with dispatch.dedupe_property (user properties exist only in MQTT 5), '
                          f'not {broker.protocol!r}', file=file, key="broker.protocol")
    s = Reader(file, "status", top.take("status", dict, {}))
    status = StatusConfig(
        interval=s.number("interval", (int, float), 2.0),
        canary_interval=s.number("canary_interval", (int, float), 10.0),
        metrics_port=s.number("metrics_port", int, None),
        metrics_host=s.take("metrics_host", str, "127.0.0.1"),
        gap_settle_s=s.number("gap_settle_s", (int, float), 60.0),
    )
    s.done()
    top.done()
    return Config(path=Path(file), django=django_cfg, broker=broker, subscribe=subscribe,
                  dispatch=dispatch, status=status)


CANARY_HEALTH_WINDOW_S = 60.0       # status.CANARY_MAX_AGE_S: health wants a round trip this recent


def warnings(config: Config) -> list[str]:
    """Settings that are valid but probably not what the operator wants: said by `mqttd check`
    and logged by `mqttd run` at start, never refused."""
    out = []
    b, d = config.broker, config.dispatch
    if b.session_expiry == 0 and b.protocol != "3.1.1":
        out.append("broker.session_expiry = 0: the broker ends the session with the connection, so messages "
                   "published while mqttd is disconnected or restarting are lost (the persistent session is "
                   "what keeps them); set it to at least the longest outage to ride out (default 86400)")
    if b.receive_maximum is not None and b.receive_maximum < d.batch_size:
        out.append(f"broker.receive_maximum ({b.receive_maximum}) is below dispatch.batch_size ({d.batch_size}): "
                   "messages are acked only after their batch commits, so no batch can grow past "
                   f"{b.receive_maximum}; batches flush on dispatch.batch_linger_ms instead")
    if config.status.canary_interval >= CANARY_HEALTH_WINDOW_S:
        out.append(f"status.canary_interval = {config.status.canary_interval:g}s: health wants a canary round "
                   f"trip in the last {CANARY_HEALTH_WINDOW_S:g}s, so this instance is reported unhealthy "
                   "between canaries")
    return out


def read_toml(path: Path, missing: str = "file not found") -> dict[str, Any]:
    """The TOML document at ``path``; a missing, unreadable or invalid file is a ConfigError naming
    it (``missing``: what to say when it does not exist). The daemon's file and the inventory."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(missing, file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from None


def load(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the file at ``path``; every failure is a ConfigError (exit 78)."""
    env = os.environ if env is None else env
    return parse(read_toml(path), str(path), env)
