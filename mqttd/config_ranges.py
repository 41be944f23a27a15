"""The allowed range of every number in the configuration file, and the table reader that holds
each number to it (``mqttd.config`` parses the file; ``mqttd.config_broker`` the [broker] table).
"""
from __future__ import annotations

from typing import Any

from mqttd.tables import TableReader

# The allowed range of every number in the file, (lowest, highest, unit), both inclusive: the MQTT
# protocol's own limits where it has one (a value past them used to pass `check` and then crash the
# network thread at connect), a sane bound elsewhere. docs/configuration.md shows the same table.
RANGES: dict[str, dict[str, tuple[float, float, str]]] = {
    "broker": {
        "port": (1, 65535, ""),
        "keepalive": (5, 65535, "seconds"),                 # MQTT: two bytes
        "session_expiry": (0, 4294967295, "seconds"),       # MQTT 5: four bytes; 0 ends with the connection
        "receive_maximum": (1, 65535, "messages"),          # MQTT 5: two bytes, 0 is a protocol error
        "reconnect_min": (0.05, 600, "seconds"),
        "reconnect_max": (0.05, 600, "seconds"),
    },
    "subscribe": {
        "qos": (0, 2, ""),
    },
    "dispatch": {
        "batch_size": (1, 65535, "messages"),               # the in-flight window is at most 65535
        "batch_linger_ms": (0, 60000, "milliseconds"),
        "max_backlog": (1, 1_000_000, "messages"),
        "max_payload": (0, 268_435_455, "bytes"),           # MQTT's largest packet; 0: no limit
        "handler_timeout": (0.1, 86400, "seconds"),
    },
    "status": {
        "interval": (0.1, 5, "seconds"),                    # the status file is fresh for 15 s
        "canary_interval": (0.1, 3600, "seconds"),
        "metrics_port": (0, 65535, ""),                     # 0: any free port
        "gap_settle_s": (1, 86400, "seconds"),              # gap detection: a hole counts after this
    },
}


def written(value: float) -> str:
    """4294967295 as written, not 4.29497e+09; 0.05 as 0.05."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class Reader(TableReader):
    """One table of the config (``take``, ``key``, ``error``: ``mqttd.tables``), plus ranges."""

    def number(self, name: str, kinds: type | tuple[type, ...], default: Any, section: str | None = None) -> Any:
        """A number inside its RANGES entry (``section`` defaults to the last part of the prefix)."""
        value = self.take(name, kinds, default)
        if value is None:
            return None
        lo, hi, unit = RANGES[section or self.prefix.rpartition(".")[2]][name]
        if not lo <= value <= hi:           # also refuses nan, inf and -inf, which TOML allows
            unit = f" {unit}" if unit else ""
            raise self.error(name, f"must be {written(lo)}-{written(hi)}{unit}, not {value!r}")
        return value

    def done(self) -> None:
        name = self.first_unknown()
        if name is not None:
            hint = ""
            if name == "password":
                hint = " (put the password in password_file or MQTTD_BROKER_PASSWORD, never in this file)"
            raise self.error(name, f"unknown key{hint}")
