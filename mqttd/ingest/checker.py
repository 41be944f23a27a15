"""The standard-library checker for dataclass payloads (``mqttd.ingest.typed`` uses it when msgspec
is not installed): msgspec's rules and words, so a tenant sees the same results and the same error
texts either way: an int is not a bool, a float field takes an int, unknown keys are ignored, a
missing field with a default gets it, a type the checker does not know is passed on as decoded."""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from mqttd.message import Message, PayloadError

Decode = Callable[[Message], Any]


def payload_error(msg: Message, path: str, reason: str) -> PayloadError:
    """The dead letter's error: ``payload on TOPIC: $.path: reason``."""
    return PayloadError(f"payload on {msg.topic}: {path}: {reason}")


_JSON_NAMES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null", list: "array", dict: "object"}


def _json_type(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


class _Invalid(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path, self.reason = path, reason


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_expected(a) for a in typing.get_args(tp))
    if tp is type(None) or tp is None:
        return "null"
    if origin is list or tp is list:
        return "array"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "object"
    return getattr(tp, "__name__", str(tp))


def _check(tp: Any, value: Any, path: str) -> Any:
    """``value`` (decoded JSON) as ``tp``, or _Invalid naming the path."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check(arg, value, path)
            except _Invalid as exc:
                if exc.path != path:          # the right branch, wrong inside: say where
                    raise
        raise _Invalid(path, f"expected {_expected(tp)}, got {_json_type(value)}")
    if tp is type(None) or tp is None:
        if value is None:
            return None
    elif tp is bool or tp is str:
        if type(value) is tp:
            return value
    elif tp is int:
        if type(value) is int:
            return value
    elif tp is float:
        if type(value) in (int, float):
            return float(value)
    elif origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Invalid(path, f"invalid enum value {value!r}")
    elif origin is list or tp is list:
        if type(value) is list:
            (item,) = typing.get_args(tp) or (Any,)
            return [_check(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if type(value) is dict:
            _, item = typing.get_args(tp) or (str, Any)
            return {k: _check(item, v, f"{path}.{k}") for k, v in value.items()}
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if type(value) is dict:
            return _build(tp, value, path)
    else:
        return value                          # a type this checker does not know: as decoded
    raise _Invalid(path, f"expected {_expected(tp)}, got {_json_type(value)}")


_HINTS: dict[type, list[tuple[str, Any, bool]]] = {}


def _fields(tp: type) -> list[tuple[str, Any, bool]]:
    """(name, type, required) of a dataclass's init fields, resolved once per class."""
    found = _HINTS.get(tp)
    if found is None:
        hints = typing.get_type_hints(tp)
        found = [(f.name, hints.get(f.name, Any),
                  f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                 for f in dataclasses.fields(tp) if f.init]
        _HINTS[tp] = found
    return found


def _build(tp: type, data: dict[str, Any], path: str) -> Any:
    kwargs = {}
    for name, ftype, required in _fields(tp):
        if name in data:
            kwargs[name] = _check(ftype, data[name], f"{path}.{name}")
        elif required:
            raise _Invalid(f"{path}.{name}", "required field missing")
    return tp(**kwargs)


def dataclass_decoder(tp: type) -> Decode:
    _fields(tp)                               # resolve the annotations now, not on the first message

    def run(msg: Message) -> Any:
        data = msg.json()
        try:
            return _check(tp, data, "$")
        except _Invalid as exc:
            raise payload_error(msg, exc.path, exc.reason) from None

    return run
