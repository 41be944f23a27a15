"""The [broker] table: host or cluster nodes (``hosts``), protocol, TLS, credentials, reconnect
bounds, validated into a frozen ``BrokerConfig``. ``mqttd.config`` reads it for the daemon's
file; ``parse_broker`` for a broker table found elsewhere (the publisher's Django setting).

The password comes only from ``password_file`` or ``MQTTD_BROKER_PASSWORD`` and is kept out of
every repr.
"""
from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqttd.config_ranges import Reader, written
from mqttd.errors import ConfigError


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
    protocol: str = "auto"             # "5", "3.1.1", or "auto": 5, else 3.1.1 (mqtt/negotiate.py)
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
    # The nodes of a clustered broker, tried in turn on every reconnect (`hosts = ["h1:1883", ...]`);
    # empty when the file says host/port. host/port are then the first node, for code that wants one.
    hosts: tuple[tuple[str, int], ...] = ()

    def nodes(self) -> tuple[tuple[str, int], ...]:
        """Every (host, port) to try, in order: ``hosts``, else the one ``host``/``port``."""
        return self.hosts or ((self.host, self.port),)


def _read_password(broker: Reader, env: Mapping[str, str]) -> str | None:
    path = broker.take("password_file", str)
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise broker.error("password_file", f"cannot read {path}: {exc.strerror}") from None
    return env.get("MQTTD_BROKER_PASSWORD") or None


def _load_tls(tls: TLSConfig, file: str, key: str) -> None:
    """Load the certificates the way the client will at connect, so that a file that is not a
    certificate (or a key that does not match, or is encrypted) is a configuration error here
    rather than a crash in the network thread."""
    ctx = ssl.create_default_context()
    if tls.keyfile and not tls.certfile:
        raise ConfigError("needs tls.certfile (the certificate of this key)", file=file, key=f"{key}.keyfile")
    if tls.ca_certs:
        try:
            ctx.load_verify_locations(cafile=tls.ca_certs)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"{tls.ca_certs} is not a usable PEM CA certificate file: {exc}",
                              file=file, key=f"{key}.ca_certs") from None
    if tls.certfile:
        try:
            # An encrypted key would make the client prompt for a passphrase: refused instead.
            ctx.load_cert_chain(tls.certfile, tls.keyfile, password=lambda: b"")
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"cannot load {tls.certfile}{' with ' + tls.keyfile if tls.keyfile else ''} "
                              f"(PEM certificate and unencrypted key that match): {exc}",
                              file=file, key=f"{key}.certfile") from None


def read_broker(r: Reader, env: Mapping[str, str], default_protocol: str = "auto") -> BrokerConfig:
    """The broker table ``r`` validated (every key taken, an unknown key refused)."""
    protocol = str(r.take("protocol", (str, int, float), default_protocol))
    if protocol not in ("5", "3.1.1", "311", "auto"):
        raise r.error("protocol", f'must be "auto", "5" or "3.1.1", not {protocol!r}')
    tls_table = r.take("tls", dict)
    tls = None
    if tls_table is not None:
        t = Reader(r.file, r.key("tls"), tls_table)
        tls = TLSConfig(t.take("ca_certs", str), t.take("certfile", str), t.take("keyfile", str),
                        t.take("insecure", bool, False))
        t.done()
        for name in ("ca_certs", "certfile", "keyfile"):
            value = getattr(tls, name)
            if value and not os.access(value, os.R_OK):
                raise ConfigError(f"cannot read {value}", file=r.file, key=f"{r.key('tls')}.{name}")
        _load_tls(tls, r.file, r.key("tls"))
    group = r.take("shared_group", str)
    if group is not None and (not group or any(c in group for c in "/+#")):
        raise r.error("shared_group", "must be a non-empty name without '/', '+' or '#'")
    default_port = 8883 if tls else 1883
    hosts = _hosts(r, default_port)
    cfg = BrokerConfig(
        host=hosts[0][0] if hosts else r.take("host", str, "127.0.0.1"),
        port=hosts[0][1] if hosts else r.number("port", int, default_port, "broker"),
        hosts=hosts,
        protocol="3.1.1" if protocol == "311" else protocol,
        keepalive=r.number("keepalive", int, 60, "broker"),
        session_expiry=r.number("session_expiry", int, 86400, "broker"),
        username=r.take("username", str),
        password=_read_password(r, env),
        client_id=r.take("client_id", str),
        tls=tls,
        shared_group=group,
        reconnect_min=r.number("reconnect_min", (int, float), 1.0, "broker"),
        reconnect_max=r.number("reconnect_max", (int, float), 60.0, "broker"),
        receive_maximum=r.number("receive_maximum", int, None, "broker"),
    )
    if not cfg.host:
        raise r.error("host", "must not be empty")
    if cfg.reconnect_min > cfg.reconnect_max:
        raise r.error("reconnect_min", f"must be at most {r.key('reconnect_max')} ({written(cfg.reconnect_max)}), "
                                       f"not {written(cfg.reconnect_min)}")
    if cfg.client_id is not None and not (0 < len(cfg.client_id) <= 128):
        raise r.error("client_id", "must be 1-128 characters")
    r.done()
    return cfg


def _hosts(r: Reader, default_port: int) -> tuple[tuple[str, int], ...]:
    """``hosts = ["h1:1883", "h2", "[::1]:1883"]``: the nodes of one clustered broker, instead of
    host/port (a node without a port gets the default port, 8883 with tls)."""
    if "hosts" not in r.table:
        return ()
    both = [k for k in ("host", "port") if k in r.table]
    if both:
        raise r.error("hosts", f"and {' and '.join(r.key(k) for k in both)} exclude each other: list every "
                               'node in hosts ("host:port")')
    raw = r.take("hosts", list)
    if not raw:
        raise r.error("hosts", 'must list at least one "host:port"')
    out = []
    for i, item in enumerate(raw):
        key = f"hosts[{i}]"
        if not isinstance(item, str) or not item.strip():
            raise r.error(key, f'must be a "host:port" string, not {item!r}')
        host, port_text = item.strip(), ""
        if host.startswith("["):                     # [IPv6]:port
            inner, _, rest = host[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise r.error(key, f'must be "host:port" or "[v6 address]:port", not {item!r}')
            host, port_text = inner, rest[1:]
        elif host.count(":") == 1:
            host, _, port_text = host.partition(":")
        if not host:
            raise r.error(key, f"has no host name: {item!r}")
        port = default_port
        if port_text or item.strip().endswith(":"):
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise r.error(key, f"port must be 1-65535, not {port_text!r} (in {item!r})")
            port = int(port_text)
        out.append((host, port))
    return tuple(out)


def parse_broker(table: Mapping[str, Any], file: str, key: str, env: Mapping[str, str]) -> BrokerConfig:
    """Validate a broker table found elsewhere (e.g. Django's settings.MQTTD_PUBLISHER)."""
    return read_broker(Reader(file, key, table), env)
