"""Typed payloads (docs/handlers.md): a handler parameter annotated with a dataclass, a ``msgspec.Struct``
or a pydantic model receives the payload decoded from JSON and validated into that type.

The annotations are read once, when the route is registered (``typing.get_type_hints``), and
turned into one decoding function per route; nothing is inspected per message. The batch runner
decodes every message before the handler runs (``mqttd.ingest.batch``), so a payload that does not
validate is a dead letter on its own, naming the field path and the reason::

    PayloadError: payload on ble/d1/telemetry: $.rssi: expected int, got str

and its neighbours (in a ``batch=True`` call too) go on to the handler.

Validators, each used when the tenant has it (none is a dependency of mqttd):
  msgspec.Struct   msgspec (its own type)
  dataclass        msgspec when installed (about 10x faster), else mqttd.ingest.checker, which
                   gives the same results and the same error texts for the types it knows
  pydantic model   pydantic v2 (``model_validate_json``), with pydantic's own (lax) rules
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mqttd.errors import ConfigError
from mqttd.ingest.checker import Decode, dataclass_decoder, payload_error
from mqttd.message import UNPREPARED, Message, PayloadError


@dataclass(frozen=True)
class Payload:
    """How a route's handler gets its decoded payload: the keyword argument ``param`` (a list,
    aligned with the messages, for a ``batch=True`` route), filled by ``decode``."""

    param: str
    decode: Decode          # raises PayloadError naming the path and the reason
    kind: str               # for `mqttd check`: "dataclass Telemetry (msgspec)", ...

    def value(self, msg: Message) -> Any:
        """The value decoded before the call by the batch runner, else decoded now (replay)."""
        prepared = msg.prepared
        return self.decode(msg) if prepared is UNPREPARED else prepared


# ---- which parameter -------------------------------------------------------------------------------
def _is_struct(tp: Any) -> bool:
    try:
        import msgspec
    except ImportError:
        return False
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _is_pydantic(tp: Any) -> bool:
    try:
        import pydantic
    except ImportError:
        return False
    return isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def _typed(tp: Any) -> bool:
    return (isinstance(tp, type) and dataclasses.is_dataclass(tp)) or _is_struct(tp) or _is_pydantic(tp)


def payload_param(fn: Callable[..., Any], batch: bool, name: str, skip: frozenset[str] = frozenset()) -> Payload | None:
    """The typed payload parameter of handler ``fn`` (None if it has none). A per-message handler
    names it ``data: Telemetry``; a ``batch=True`` one ``data: list[Telemetry]`` beside its
    ``msgs: list[Message]``. ``skip``: the topic parameters. Raises ConfigError for annotations
    that cannot be resolved or for two typed parameters."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())[1:]          # the first is the message (or the list)
    if not any(p.annotation is not p.empty for p in params):
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - NameError for a name imported under TYPE_CHECKING, ...
        hints = _hints_one_by_one(fn, params, name, skip)
    found: list[tuple[str, Any]] = []
    for p in params:
        if p.name in skip or p.name not in hints:
            continue
        tp = hints[p.name]
        if batch:
            if typing.get_origin(tp) is list and len(typing.get_args(tp)) == 1 and _typed(typing.get_args(tp)[0]):
                found.append((p.name, typing.get_args(tp)[0]))
            elif _typed(tp):
                raise ConfigError(f"handler {name} is batch=True: annotate {p.name} as list[{tp.__name__}] "
                                  "(one value per message, in the order of the messages)")
        elif _typed(tp):
            found.append((p.name, tp))
    if not found:
        return None
    if len(found) > 1:
        raise ConfigError(f"handler {name} has more than one typed payload parameter "
                          f"({', '.join(n for n, _ in found)}): a message has one payload")
    param, tp = found[0]
    decode, kind = decoder(tp)
    return Payload(param, decode, kind)


def _hints_one_by_one(fn: Callable[..., Any], params: list[inspect.Parameter], name: str,
                      skip: frozenset[str]) -> dict[str, Any]:
    """The annotations that resolve, one parameter at a time. An unresolvable one matters only on
    a parameter mqttd must fill (no default, not a topic parameter): that can only be the typed
    payload, so the handler is refused; elsewhere (``msg: "Message"`` imported under
    TYPE_CHECKING) it is ignored, as before typed payloads existed."""
    hints: dict[str, Any] = {}
    for p in params:
        ann = p.annotation
        if ann is p.empty:
            continue
        try:
            hints[p.name] = typing.get_type_hints(_Probe(ann, getattr(fn, "__globals__", {})))["x"]
        except Exception as exc:  # noqa: BLE001
            if p.name in skip or p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            raise ConfigError(f"handler {name}: cannot resolve the annotation of {p.name} ({type(exc).__name__}: "
                              f"{exc}); mqttd reads it to decode the payload into that type") from None
    return hints


class _Probe:
    """A stand-in with one annotation, for ``typing.get_type_hints`` in the handler's globals."""

    def __init__(self, annotation: Any, globalns: dict[str, Any]) -> None:
        self.__annotations__ = {"x": annotation}
        self.__globals__ = globalns


# ---- decoders ----------------------------------------------------------------------------------------
def decoder(tp: type, use_msgspec: bool = True) -> tuple[Decode, str]:
    """A function message -> validated ``tp`` and a description. ``use_msgspec=False``: the
    standard-library checker for a dataclass even when msgspec is installed (tests compare them)."""
    if _is_pydantic(tp):
        return _pydantic_decoder(tp), f"pydantic model {tp.__name__}"
    if _is_struct(tp) or (use_msgspec and dataclasses.is_dataclass(tp) and _has_msgspec()):
        what = "msgspec.Struct" if _is_struct(tp) else "dataclass"
        return _msgspec_decoder(tp), f"{what} {tp.__name__} (msgspec)"
    return dataclass_decoder(tp), f"dataclass {tp.__name__}"


def _has_msgspec() -> bool:
    try:
        import msgspec  # noqa: F401
    except ImportError:
        return False
    return True


_AT = re.compile(r"^(?P<reason>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.DOTALL)
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")


def _msgspec_decoder(tp: type) -> Decode:
    import msgspec

    decode: Callable[[bytes], Any] = msgspec.json.Decoder(tp).decode

    def invalid(msg: Message, exc: Exception) -> PayloadError:
        m = _AT.match(str(exc))
        reason, path = (m.group("reason"), m.group("path") or "$") if m else (str(exc), "$")
        missing = _MISSING.match(reason)
        if missing:
            return payload_error(msg, f"{path}.{missing.group('field')}", "required field missing")
        return payload_error(msg, path, (reason[:1].lower() + reason[1:]).replace("`", ""))

    def run(msg: Message) -> Any:
        try:
            return decode(msg.payload)
        except msgspec.ValidationError as exc:
            raise invalid(msg, exc) from None
        except msgspec.DecodeError:
            pass
        # Not JSON to msgspec: msg.json() raises the standard error, or (NaN, a byte order mark)
        # decodes it as the standard library does, and the value is validated from there.
        try:
            return msgspec.convert(msg.json(), tp)
        except msgspec.ValidationError as exc:
            raise invalid(msg, exc) from None

    return run


def _pydantic_decoder(tp: Any) -> Decode:
    import pydantic

    def run(msg: Message) -> Any:
        try:
            return tp.model_validate_json(msg.payload)
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            if err.get("type") == "json_invalid":
                msg.json()                  # the same error as msg.json() gives
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ()))
            reason = str(err.get("msg", exc))
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise payload_error(msg, f"${loc}", reason[:1].lower() + reason[1:] + more) from None

    return run
