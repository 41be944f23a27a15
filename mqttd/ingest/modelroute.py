"""Model routes (docs/handlers.md): a ``[[subscribe]]`` table with ``model`` and ``fields`` stores one row per
message without handler code.

    [[subscribe]]
    topic = "ble/{device}/telemetry"
    model = "sensors.Reading"
    fields = { device = "{device}", rssi = "$.rssi", temp = "$.temp", received_at = "$received_at" }
    dedupe = "$.id"

A model route is a ``batch=True`` Route like any other: same batch transaction, same dedupe keys,
same promise (acked after commit). Its two halves:

* ``Mapping.prepare`` (the typed-payload step, run by the batch runner before any handler call):
  the message's row as Python values, checked against each field. A value that is missing or does
  not fit becomes a dead letter naming the field, e.g. ``PayloadError: payload on ble/d1/telemetry:
  field rssi ($.rssi): expected int, got str``; its neighbours are stored.
* ``Writer`` (the handler): the rows in one statement, on the batch's connection: a binary
  ``COPY`` on PostgreSQL (psycopg 3), one ``executemany`` on SQLite, ``bulk_create`` elsewhere.
  A row the database still refuses (a unique constraint) fails the call, and the batch runner's
  careful pass (savepoints, then one message at a time) makes that row alone the dead letter.

Everything that can be checked without a message is checked when the route is built (``mqttd
check`` and ``mqttd run`` alike, exit 78 naming the key): the model, every field name, a source of
the wrong kind for its field, a topic parameter the filter does not have, a required field left out.
"""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mqttd.errors import ConfigError
from mqttd.ingest.convert import KINDS, Convert, SourceKind, converter, kind_of
from mqttd.ingest.typed import Payload
from mqttd.message import Message, PayloadError
from mqttd.topics import TopicFilter

# ---- value specs --------------------------------------------------------------------------------------
_PATH_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]")
_MISSING: Any = object()


@dataclass(frozen=True)
class Source:
    """Where a value comes from: ``spec`` as written, ``kind`` one of SourceKind."""

    spec: str
    kind: SourceKind
    name: str = ""                              # the topic parameter
    steps: tuple[str | int, ...] = ()           # the JSON path
    optional: bool = False                      # "$.a?": missing is NULL, not a dead letter

    def get(self, msg: Message, data: Any) -> Any:
        """The value for ``msg`` (``data``: its decoded JSON, when the route needs it), or _MISSING."""
        if self.kind == "path":
            for step in self.steps:
                if isinstance(step, int):
                    if type(data) is not list or step >= len(data):
                        return _MISSING
                elif type(data) is not dict or step not in data:
                    return _MISSING
                data = data[step]
            return data
        if self.kind == "param":
            return msg.params.get(self.name, _MISSING)
        if self.kind == "topic":
            return msg.topic
        if self.kind == "payload":
            return msg.payload
        return dt.datetime.fromtimestamp(msg.received_at, dt.UTC)


def parse_source(spec: str, tf: TopicFilter, file: str | None, key: str) -> Source:
    """``{param}``, ``$.a.b[0]``, ``$topic``, ``$payload`` or ``$received_at``."""
    if spec in ("$topic", "$payload", "$received_at"):
        return Source(spec, spec[1:])           # type: ignore[arg-type]
    if spec.startswith("{") and spec.endswith("}"):
        name = spec[1:-1]
        if name not in tf.names:
            have = ", ".join(f"{{{n}}}" for n in tf.names if n) or "none"
            raise ConfigError(f"{spec} is not a parameter of topic {tf.pattern!r} (it has: {have})", file=file, key=key)
        return Source(spec, "param", name=name)
    if spec.startswith("$") and len(spec) > 1:
        optional = spec.endswith("?")
        path = spec[:-1] if optional else spec
        steps: list[str | int] = []
        pos = 1
        for m in _PATH_STEP.finditer(path, 1):
            if m.start() != pos:
                break
            steps.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
            pos = m.end()
        if pos == len(path) and steps:
            return Source(spec, "path", steps=tuple(steps), optional=optional)
    raise ConfigError(f"{spec!r} is not a value: use a topic parameter \"{{name}}\", a JSON path \"$.a.b\" "
                      "(\"$.a[0]\" for a list item; \"$.a?\" when a missing value is NULL), \"$topic\", "
                      "\"$payload\" or \"$received_at\"", file=file, key=key)


def dedupe_key(spec: str, tf: TopicFilter, file: str | None, key: str) -> Callable[[Message], str | None]:
    """A ``dedupe=`` function from a value spec: the value as text; None (no dedupe for that
    message) when the payload does not carry it."""
    source = parse_source(spec, tf, file, key)
    if source.kind in ("payload", "received_at"):
        raise ConfigError(f"{spec} cannot be a dedupe key (use an id the publisher sets, e.g. \"$.id\")",
                          file=file, key=key)
    needs_json = source.kind == "path"

    def fn(msg: Message) -> str | None:
        value = source.get(msg, msg.json() if needs_json else None)
        return None if value is _MISSING or value is None else str(value)

    return fn


# ---- the mapping ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    field: Any            # the Django field
    kind: str             # mqttd.ingest.convert.KINDS key
    source: Source | None  # None: filled at write time (auto_now, a default, NULL)
    conv: Convert | None = None


class Mapping:
    """A model and its fields, checked against each other once."""

    def __init__(self, label: str, fields: tuple[tuple[str, str], ...], tf: TopicFilter, file: str | None,
                 where: str) -> None:
        from django.apps import apps
        from django.core.exceptions import FieldDoesNotExist
        from django.db import connections, router

        try:
            self.model = apps.get_model(label)
        except (LookupError, ValueError) as exc:
            raise ConfigError(f"no model {label!r} ({exc})", file=file, key=f"{where}.model") from None
        self.label = label
        meta = self.model._meta
        connection = connections[router.db_for_write(self.model)]
        mapped: dict[str, Column] = {}
        for name, spec in fields:
            key = f"{where}.fields.{name}"
            try:
                field = meta.get_field(name)
            except FieldDoesNotExist:
                known = ", ".join(f.name for f in meta.concrete_fields)
                raise ConfigError(f"{label} has no field {name!r} (its fields: {known})", file=file, key=key) from None
            kind = kind_of(field)
            if kind is None or not field.concrete or getattr(field, "generated", False):
                raise ConfigError(f"{label}.{name} ({type(field).__name__}) cannot be filled by a model route",
                                  file=file, key=key)
            source = parse_source(spec, tf, file, key)
            if source.optional and not field.null:
                raise ConfigError(f"{spec} may be missing (the trailing ?), and {label}.{name} is not nullable: "
                                  "remove the ? (a message without it is then a dead letter) or make the field "
                                  "null=True", file=file, key=key)
            if source.kind not in KINDS[kind].sources:
                raise ConfigError(f"wrong type: {spec} ({source.kind.replace('_', ' ')}) cannot fill "
                                  f"{label}.{name} ({type(field).__name__}); it takes "
                                  f"{', '.join(KINDS[kind].sources)}", file=file, key=key)
            mapped[field.name] = Column(field, kind, source, converter(kind, field, connection))
        self.columns = list(mapped.values())
        for field in meta.concrete_fields:
            if field.name in mapped or _db_fills(field):
                continue
            if _required(field):
                raise ConfigError(f"missing required field {label}.{field.name} ({type(field).__name__}, not null, "
                                  "no default): map it in fields", file=file, key=f"{where}.fields")
            kind = kind_of(field) or "other"
            self.columns.append(Column(field, kind, None))
        # (field, source, converter) of the mapped columns, which come first; then the write-time ones.
        self.mapped: list[tuple[Any, Source, Convert]] = [
            (c.field, c.source, c.conv) for c in self.columns if c.source is not None and c.conv is not None]
        self.needs_json = any(source.kind == "path" for _, source, _ in self.mapped)

    def prepare(self, msg: Message) -> tuple[Any, ...]:
        """The row of ``msg`` for the mapped columns, or PayloadError naming the field."""
        data = msg.json() if self.needs_json else None
        row: list[Any] = []
        for field, source, conv in self.mapped:
            value = source.get(msg, data)
            if value is _MISSING:
                if source.optional:
                    row.append(None)
                    continue
                raise PayloadError(f"payload on {msg.topic}: field {field.name} ({source.spec}): missing")
            try:
                row.append(conv(value))
            except ValueError as exc:
                raise PayloadError(f"payload on {msg.topic}: field {field.name} ({source.spec}): {exc}") from None
        return tuple(row)


def _db_fills(field: Any) -> bool:
    """Columns the database fills itself: an auto-increment key, a db_default, a generated column."""
    from django.db.models import NOT_PROVIDED
    from django.db.models.fields import AutoFieldMixin

    return isinstance(field, AutoFieldMixin) or getattr(field, "generated", False) or \
        getattr(field, "db_default", NOT_PROVIDED) is not NOT_PROVIDED


def _required(field: Any) -> bool:
    if field.null or field.has_default() or getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
        return False
    return not (field.blank and field.empty_strings_allowed)


def model_route(label: str, fields: tuple[tuple[str, str], ...], tf: TopicFilter, file: str | None,
                where: str) -> tuple[Callable[..., None], Payload]:
    """The handler and the payload step of a model route (a batch=True Route)."""
    from mqttd.ingest.modelwrite import Writer

    mapping = Mapping(label, fields, tf, file, where)
    writer = Writer(mapping.model, mapping.columns)
    return writer, Payload("rows", mapping.prepare, f"model {label} ({writer.describe()})")
