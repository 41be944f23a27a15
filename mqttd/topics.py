"""Topic filters: MQTT wildcards plus named parameters, validated when built.

``ble/{device}/telemetry`` subscribes as ``ble/+/telemetry`` and hands ``device=...`` to the
handler; ``logs/{path...}`` subscribes as ``logs/#``. A ``$share/GROUP/`` prefix is kept apart
from the filter itself, because matching ignores it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mqttd.errors import ConfigError

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}$")


@dataclass(frozen=True)
class TopicFilter:
    pattern: str                      # as written by the user, e.g. "ble/{device}/telemetry"
    levels: tuple[str, ...]           # broker levels: literal, "+" or "#"
    names: tuple[str | None, ...]     # parameter name per level (None for literals and bare wildcards)
    share_group: str | None = None

    @classmethod
    def parse(cls, pattern: str, share_group: str | None = None) -> TopicFilter:
        text = pattern
        if text.startswith("$share/"):
            parts = text.split("/", 2)
            if len(parts) < 3 or not parts[1] or not parts[2]:
                raise ConfigError(f"bad shared subscription {pattern!r}: expected $share/GROUP/FILTER")
            share_group, text = parts[1], parts[2]
        if not text:
            raise ConfigError("empty topic filter")
        if "\x00" in text:
            raise ConfigError(f"topic filter {pattern!r} contains a NUL character")
        if len(text.encode("utf-8")) > 65535:
            raise ConfigError("topic filter longer than 65535 bytes")
        levels: list[str] = []
        names: list[str | None] = []
        raw = text.split("/")
        for i, level in enumerate(raw):
            last = i == len(raw) - 1
            m = _PARAM.match(level)
            if m:
                name, rest = m.group(1), m.group(2)
                if name in names:
                    raise ConfigError(f"topic filter {pattern!r} names {{{name}}} twice")
                if rest and not last:
                    raise ConfigError(f"topic filter {pattern!r}: {{{name}...}} must be the last level")
                levels.append("#" if rest else "+")
                names.append(name)
            elif level in ("+", "#"):
                if level == "#" and not last:
                    raise ConfigError(f"topic filter {pattern!r}: '#' must be the last level")
                levels.append(level)
                names.append(None)
            elif "+" in level or "#" in level or "{" in level or "}" in level:
                raise ConfigError(f"topic filter {pattern!r}: wildcards must fill a whole level, not {level!r}")
            else:
                levels.append(level)
                names.append(None)
        return cls(pattern, tuple(levels), tuple(names), share_group)

    @property
    def filter(self) -> str:
        """The filter as the broker matches it, without any $share prefix."""
        return "/".join(self.levels)

    @property
    def subscription(self) -> str:
        """What is sent in SUBSCRIBE: the filter, behind $share/GROUP/ when shared."""
        return f"$share/{self.share_group}/{self.filter}" if self.share_group else self.filter

    def match(self, topic: str) -> dict[str, str] | None:
        """The named parameters if ``topic`` matches, else None."""
        parts = topic.split("/")
        levels = self.levels
        # MQTT: a filter starting with a wildcard never matches a topic starting with '$'.
        if topic.startswith("$") and levels[0] in ("+", "#"):
            return None
        params: dict[str, str] = {}
        names = self.names
        n = len(parts)
        for i, level in enumerate(levels):
            if level == "#":
                if names[i]:
                    params[names[i]] = "/".join(parts[i:])  # type: ignore[index]
                return params
            if i >= n:
                return None
            if level == "+":
                if names[i]:
                    params[names[i]] = parts[i]  # type: ignore[index]
            elif level != parts[i]:
                return None
        return params if n == len(levels) else None

    def covers(self, other: TopicFilter) -> bool:
        """True if every topic ``other`` matches is matched by this filter too."""
        b = other.levels
        for i, a in enumerate(self.levels):
            if a == "#":
                return not (i == 0 and b[0].startswith("$"))
            if i >= len(b) or b[i] == "#":
                return False
            if a == "+":
                if b[i].startswith("$") and i == 0:
                    return False
                continue
            if a != b[i]:
                return False
        return len(self.levels) == len(b)


def validate_topic(topic: str) -> str:
    """A topic to publish to: no wildcards, not empty."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"invalid topic {topic!r}: must be non-empty without '+', '#' or NUL")
    return topic
