"""Model routes: which Django fields a model route can fill, from which sources, and how a value is
checked and converted for a field (before the handler, so that a bad value is a dead letter of
its own naming the field, not a failed COPY for the whole batch).

The rules are JSON's, strict the way typed payloads are: an int field takes a JSON integer (not a
bool, not 1.5, not "12"), a float field an integer or a float, a text field a string within
``max_length``. A topic parameter is text, converted where the field asks for a number or a UUID.
A datetime is ``$received_at``, an ISO 8601 string, or seconds since the epoch (UTC).
"""
from __future__ import annotations

import datetime as dt
import decimal
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mqttd.message import loads_json

SourceKind = Literal["param", "path", "topic", "payload", "received_at"]
Convert = Callable[[Any], Any]


@dataclass(frozen=True)
class Kind:
    sources: tuple[SourceKind, ...]       # the sources that can fill such a field ("wrong type" otherwise)


KINDS: dict[str, Kind] = {
    "text": Kind(("param", "path", "topic", "payload")),
    "int": Kind(("param", "path")),
    "float": Kind(("param", "path")),
    "decimal": Kind(("param", "path")),
    "bool": Kind(("path",)),
    "datetime": Kind(("path", "received_at")),
    "date": Kind(("path",)),
    "json": Kind(("path", "payload", "param", "topic")),
    "binary": Kind(("path", "payload")),
    "uuid": Kind(("param", "path")),
}

_BY_TYPE = {
    **dict.fromkeys(("CharField", "TextField", "SlugField", "EmailField", "URLField", "GenericIPAddressField",
                     "IPAddressField", "FilePathField"), "text"),
    **dict.fromkeys(("IntegerField", "BigIntegerField", "SmallIntegerField", "PositiveIntegerField",
                     "PositiveBigIntegerField", "PositiveSmallIntegerField", "AutoField", "BigAutoField",
                     "SmallAutoField"), "int"),
    "FloatField": "float", "DecimalField": "decimal", "BooleanField": "bool", "DateTimeField": "datetime",
    "DateField": "date", "JSONField": "json", "BinaryField": "binary", "UUIDField": "uuid",
}


def kind_of(field: Any) -> str | None:
    """The kind of a concrete field (a foreign key: its target's, filled with the key value)."""
    if getattr(field, "many_to_many", False) or getattr(field, "one_to_many", False):
        return None
    target = field.target_field if getattr(field, "many_to_one", False) or getattr(field, "one_to_one", False) \
        else field
    return _BY_TYPE.get(target.get_internal_type())


_JSON_NAMES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null", list: "array",
               dict: "object", bytes: "bytes"}


def _got(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


_INT_TEXT = re.compile(r"-?[0-9]+")


def converter(kind: str, field: Any, connection: Any) -> Convert:
    """value -> the field's Python value, or ValueError with the reason (mqttd.ingest.modelroute
    turns it into a PayloadError naming the field). Built once per column. ``None`` is NULL for a
    nullable field, and refused by the others."""
    conv = _converter(kind, field, connection)
    if not field.null:
        return conv

    def nullable(value: Any) -> Any:
        return None if value is None else conv(value)

    return nullable


def _converter(kind: str, field: Any, connection: Any) -> Convert:   # noqa: C901 - one branch per kind
    if kind == "text":
        limit = field.max_length

        def text(value: Any) -> Any:
            if type(value) is bytes:            # $payload into a text field
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if type(value) is not str:
                raise ValueError(f"expected str, got {_got(value)}")
            if limit is not None and len(value) > limit:
                raise ValueError(f"{len(value)} characters, longer than max_length {limit}")
            return value

        return text
    if kind == "int":
        internal = (field.target_field if field.is_relation else field).get_internal_type()
        lo, hi = connection.ops.integer_field_range(internal)

        def integer(value: Any) -> Any:
            if type(value) is str and _INT_TEXT.fullmatch(value):      # a topic parameter
                value = int(value)
            if type(value) is not int:
                raise ValueError(f"expected int, got {_got(value)}")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ValueError(f"{value} out of range for {type(field).__name__} ({lo} to {hi})")
            return value

        return integer
    if kind == "float":
        def real(value: Any) -> Any:
            if type(value) is str:
                try:
                    return float(value)
                except ValueError:
                    raise ValueError(f"expected float, got str {value!r}") from None
            if type(value) not in (int, float):
                raise ValueError(f"expected float, got {_got(value)}")
            return float(value)

        return real
    if kind == "bool":
        def boolean(value: Any) -> Any:
            if type(value) is not bool:
                raise ValueError(f"expected bool, got {_got(value)}")
            return value

        return boolean
    if kind == "datetime":
        return _datetime_converter()
    if kind == "date":
        def date(value: Any) -> Any:
            if type(value) is not str:
                raise ValueError(f"expected an ISO 8601 date string, got {_got(value)}")
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an ISO 8601 date") from None

        return date
    if kind == "json":
        def json_value(value: Any) -> Any:
            if type(value) is bytes:             # $payload into a JSON field
                try:
                    return loads_json(value)
                except (ValueError, RecursionError) as exc:
                    raise ValueError(f"not valid JSON: {exc}") from None
            return value

        return json_value
    if kind == "binary":
        def binary(value: Any) -> Any:
            if type(value) is str:
                return value.encode("utf-8")
            if type(value) is not bytes:
                raise ValueError(f"expected str, got {_got(value)}")
            return value

        return binary
    if kind == "uuid":
        def uuid_value(value: Any) -> Any:
            if type(value) is not str:
                raise ValueError(f"expected a UUID string, got {_got(value)}")
            try:
                return uuid.UUID(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a UUID") from None

        return uuid_value
    if kind == "decimal":
        def dec(value: Any) -> Any:
            if type(value) not in (int, float, str):
                raise ValueError(f"expected a number, got {_got(value)}")
            try:
                return decimal.Decimal(str(value))
            except decimal.InvalidOperation:
                raise ValueError(f"{value!r} is not a number") from None

        return dec
    raise AssertionError(kind)


def _datetime_converter() -> Convert:
    from django.conf import settings
    from django.utils import timezone
    from django.utils.dateparse import parse_datetime

    use_tz = settings.USE_TZ

    def when(value: Any) -> Any:
        if isinstance(value, dt.datetime):            # $received_at (aware, UTC)
            stamp = value
        elif type(value) in (int, float):             # seconds since the epoch
            try:
                stamp = dt.datetime.fromtimestamp(value, dt.UTC)
            except (OverflowError, OSError, ValueError):
                raise ValueError(f"{value} is not a time (seconds since the epoch)") from None
        elif type(value) is str:
            try:
                parsed = parse_datetime(value)
            except ValueError:
                parsed = None
            if parsed is None:
                raise ValueError(f"{value!r} is not an ISO 8601 date and time") from None
            stamp = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)
        else:
            raise ValueError(f"expected an ISO 8601 string or seconds since the epoch, got {_got(value)}")
        return stamp if use_tz else timezone.make_naive(stamp, timezone.get_default_timezone())

    return when


