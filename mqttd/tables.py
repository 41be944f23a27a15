"""Reading one TOML table into typed values, naming the file and the key in every error.

The one shape behind both of mqttd's TOML files: the config (``mqttd.config``) and the inventory
(``mqttd.deploy.inventory``) each subclass ``TableReader`` with the readers their keys need.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mqttd.errors import ConfigError


class TableReader:
    """One table of ``file``; ``prefix`` is its dotted key (``broker``, ``subscribe[2]``, or "" at
    the top level). ``take`` removes what it reads, so that ``leftover`` finds unknown keys."""

    def __init__(self, file: str, prefix: str, table: Any) -> None:
        self.file, self.prefix = file, prefix
        if not isinstance(table, Mapping):
            raise ConfigError("must be a table", file=file, key=prefix or None)
        self.table = dict(table)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str | None, reason: str) -> ConfigError:
        return ConfigError(reason, file=self.file, key=self.key(name) if name else (self.prefix or None))

    def take(self, name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
        """The value of ``name`` if it is one of ``kinds`` (a bool is never taken for a number),
        ``default`` if absent; raises naming file, key, the type wanted and the value found."""
        if name not in self.table:
            return default
        value = self.table.pop(name)
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            want = " or ".join(k.__name__ for k in kinds)
            raise self.error(name, f"must be {want}, not {type(value).__name__} {value!r}")
        return value

    def first_unknown(self, known: Iterable[str] | None = None) -> str | None:
        """The first key not read yet (``known`` None), or not among ``known``; None if none."""
        names = set(known) if known is not None else None
        left = sorted(k for k in self.table if names is None or k not in names)
        return left[0] if left else None
