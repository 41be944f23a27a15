"""The Message value handed to handlers. No paho type leaves the transport except inside here,
where MQTT 5 properties are turned into plain values on first access (most handlers never ask,
and the per-message cost matters at tens of thousands of messages a second).

JSON is decoded by the fastest well-kept library installed (msgspec, else orjson: the optional
extras ``django-mqttd[fast]`` / ``[orjson]``), else the standard library, with the standard
library's results and errors: a payload the fast decoder refuses, or may read differently, is
decoded again by ``json.loads``, which then gives the value or the error (a rare path: NaN,
integers of 19 digits or more under orjson, a byte order mark, invalid JSON).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

from mqttd.errors import MqttdError

_stdlib_loads: Callable[[bytes], Any] = json.loads


def _msgspec_loads() -> Callable[[bytes], Any] | None:
    try:
        import msgspec
    except ImportError:
        return None
    decode = msgspec.json.Decoder().decode

    def loads(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception:  # noqa: BLE001 - malformed, NaN, out of range, too deep: the stdlib decides
            return _stdlib_loads(data)

    return loads


# orjson reads an integer past 64 bits as a float (the stdlib and msgspec keep it exact): a
# payload with a run of 19 digits (-9223372036854775809 has 19) goes to the stdlib. One C-level
# scan, a few hundred ns.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _orjson_loads() -> Callable[[bytes], Any] | None:
    try:
        import orjson
    except ImportError:
        return None
    decode, long_digits = orjson.loads, _LONG_DIGITS.search

    def loads(data: bytes) -> Any:
        if long_digits(data) is not None:
            return _stdlib_loads(data)
        try:
            return decode(data)
        except Exception:  # noqa: BLE001
            return _stdlib_loads(data)

    return loads


def json_backends() -> dict[str, Callable[[bytes], Any]]:
    """Every JSON decoder usable here, fastest first (``stdlib`` always)."""
    found = {"msgspec": _msgspec_loads(), "orjson": _orjson_loads(), "stdlib": _stdlib_loads}
    return {name: fn for name, fn in found.items() if fn is not None}


def _choose() -> tuple[str, Callable[[bytes], Any]]:
    backends = json_backends()
    # MQTTD_JSON=stdlib|orjson|msgspec picks one (to compare them; the default is the fastest).
    wanted = os.environ.get("MQTTD_JSON", "")
    name = wanted if wanted in backends else next(iter(backends))
    return name, backends[name]


JSON_BACKEND, loads_json = _choose()

# ``Message.prepared`` before the batch runner decoded the payload for the route (typed payloads,
# model routes: mqttd.ingest.typed).
UNPREPARED: Any = object()


class PayloadError(MqttdError, ValueError):
    """The payload is not the text or JSON the handler asked for."""


def _plain(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, list):
        return [tuple(v) if isinstance(v, tuple) else v for v in value]
    return value


class Message:
    """One MQTT message as received. ``params`` holds the named wildcards of the matched route."""

    __slots__ = ("topic", "payload", "qos", "retain", "mid", "dup", "received_at", "params",
                 "generation", "prepared", "_raw_properties", "_properties")

    def __init__(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, mid: int = 0,
                 dup: bool = False, received_at: float = 0.0, properties: dict[str, Any] | None = None,
                 params: dict[str, str] | None = None, generation: int = 0, raw_properties: Any = None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.mid = mid
        self.dup = dup
        self.received_at = received_at     # wall-clock time (time.time()) of receipt
        self.params = params if params is not None else {}
        self.generation = generation       # which broker connection delivered it (acks go only there)
        self._raw_properties = raw_properties
        self._properties = properties
        # The payload decoded for the one route this object is handed to (a copy per route when
        # a message matches several): set by the batch runner before the handler runs.
        self.prepared: Any = UNPREPARED

    @property
    def text(self) -> str:
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"payload on {self.topic} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def json(self) -> Any:
        """The payload parsed as JSON; a clear PayloadError when it is not."""
        try:
            return loads_json(self.payload)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise PayloadError(f"payload on {self.topic} is not valid JSON: {exc}") from None

    @property
    def properties(self) -> dict[str, Any]:
        """MQTT 5 properties as a plain dict (``{}`` on 3.1.1), e.g. ``{"ContentType": "..."}``."""
        if self._properties is None:
            raw = self._raw_properties
            props: dict[str, Any] = {}
            if raw is not None:
                for name in getattr(raw, "names", {}):
                    attr = name.replace(" ", "")
                    if hasattr(raw, attr):
                        props[attr] = _plain(getattr(raw, attr))
            self._properties = props
            self._raw_properties = None
        return self._properties

    @property
    def has_properties(self) -> bool:
        """Does the message carry any MQTT 5 property? Cheap: nothing is decoded or built (gap
        detection asks it of every message of every batch)."""
        return self._raw_properties is not None or bool(self._properties)

    @property
    def user_properties(self) -> dict[str, str]:
        if self._properties is None and self._raw_properties is not None:
            # Straight from paho's Properties: building the whole dict (``properties``) costs ~80 us
            # a message (a lookup per property name), and gap detection reads every message's stamp.
            return dict(getattr(self._raw_properties, "UserProperty", None) or [])
        return dict(self.properties.get("UserProperty", []))

    def with_params(self, params: dict[str, str]) -> Message:
        """A copy carrying another route's params (a message may match several routes)."""
        copy = Message(self.topic, self.payload, self.qos, self.retain, self.mid, self.dup,
                       self.received_at, self._properties, params, self.generation, self._raw_properties)
        return copy

    def __repr__(self) -> str:
        return f"<Message {self.topic!r} qos={self.qos} mid={self.mid} {len(self.payload)}B>"
