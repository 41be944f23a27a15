"""The Message value handed to handlers. No paho type leaves the transport except inside here,
where MQTT 5 properties are turned into plain values on first access (most handlers never ask,
and the per-message cost matters at tens of thousands of messages a second).
"""
from __future__ import annotations

import json
from typing import Any

from .errors import MqttdError


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
                 "generation", "_raw_properties", "_properties")

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

    @property
    def text(self) -> str:
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"payload on {self.topic} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def json(self) -> Any:
        """The payload parsed as JSON; a clear PayloadError when it is not."""
        try:
            return json.loads(self.payload)
        except (UnicodeDecodeError, ValueError) as exc:
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
    def user_properties(self) -> dict[str, str]:
        return dict(self.properties.get("UserProperty", []))

    def with_params(self, params: dict[str, str]) -> "Message":
        """A copy carrying another route's params (a message may match several routes)."""
        copy = Message(self.topic, self.payload, self.qos, self.retain, self.mid, self.dup,
                       self.received_at, self._properties, params, self.generation, self._raw_properties)
        return copy

    def __repr__(self) -> str:
        return f"<Message {self.topic!r} qos={self.qos} mid={self.mid} {len(self.payload)}B>"
