"""Model routes, the writing half: the rows ``Mapping.prepare`` made, in one statement per batch,
on the batch's connection and inside the batch transaction, like any handler.

* PostgreSQL with psycopg 3: one binary ``COPY t (cols) FROM STDIN (FORMAT BINARY)``. The column
  types are read from the catalogue once (not guessed from the model: a custom field may store
  another type, and binary COPY must match the column exactly); a column whose type psycopg
  cannot write in binary makes this writer use ``bulk_create`` instead.
* SQLite: one ``executemany`` of prepared parameters (the ORM's per-object work is most of
  ``bulk_create``'s cost there).
* Elsewhere: ``bulk_create``.

A driver error is raised as Django's own exception (``wrap_database_errors``), so that a
connection lost during a COPY is an outage (the batch is retried) and not a dead letter.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from mqttd.message import Message

log = logging.getLogger("mqttd.dispatch")

_PREP_KINDS = ("datetime", "date", "json", "uuid", "decimal", "other")   # need get_db_prep_save on SQLite


class Writer:
    """The handler of a model route: ``writer(msgs, rows)``."""

    mqttd_batch = True

    def __init__(self, model: Any, columns: list[Any]) -> None:
        self.model = model
        self.columns = columns
        self.nmapped = sum(1 for c in columns if c.source is not None)
        # Write-time values of the columns no source fills: now() for auto_now(_add), else the default.
        self.extras: list[tuple[bool, Callable[[], Any]]] = [
            (bool(getattr(c.field, "auto_now", False) or getattr(c.field, "auto_now_add", False)), c.field.get_default)
            for c in columns[self.nmapped:]]
        self._copy_types: dict[str, list[int] | None] = {}     # per database alias, read once
        self.__name__ = self.__qualname__ = f"model_route[{model._meta.label}]"
        self.__module__ = "mqttd.ingest.modelwrite"

    def describe(self) -> str:
        names = ", ".join(c.field.name for c in self.columns[: self.nmapped])
        return f"{names}; COPY on PostgreSQL, bulk insert elsewhere"

    def _full_rows(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        if not self.extras:
            return rows
        from django.utils import timezone

        now = timezone.now()
        extras = self.extras
        if all(auto for auto, _ in extras):
            tail = tuple(now for _ in extras)
            return [row + tail for row in rows]
        return [row + tuple(now if auto else default() for auto, default in extras) for row in rows]

    def __call__(self, msgs: list[Message], rows: list[tuple[Any, ...]]) -> None:
        from django.db import connections, router

        if not rows:
            return
        conn = connections[router.db_for_write(self.model)]
        conn.ensure_connection()          # replay may call before any query: the driver decides the path
        full = self._full_rows(rows)
        meta = self.model._meta
        table = conn.ops.quote_name(meta.db_table)
        cols = ", ".join(conn.ops.quote_name(c.field.column) for c in self.columns)
        if conn.vendor == "postgresql" and hasattr(conn.connection, "pgconn"):         # psycopg 3
            types = self._types(conn, conn.alias)
            if types is not None:
                with conn.cursor() as cur, conn.wrap_database_errors:
                    with cur.cursor.copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.set_types(types)
                        for row in full:
                            copy.write_row(row)
                return
        if conn.vendor == "sqlite":
            preps = [self._sqlite_prep(c, conn) for c in self.columns]
            if any(preps):
                full = [tuple(v if p is None or v is None else p(v) for p, v in zip(preps, row, strict=True))
                        for row in full]
            marks = ", ".join(["%s"] * len(self.columns))
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", full)
            return
        attnames = [c.field.attname for c in self.columns]
        self.model.objects.using(conn.alias).bulk_create(
            [self.model(**dict(zip(attnames, row, strict=True))) for row in full], batch_size=1000)

    @staticmethod
    def _sqlite_prep(column: Any, conn: Any) -> Callable[[Any], Any] | None:
        """How a column's Python value becomes SQLite's, None where it is already (text, numbers,
        bytes). A datetime goes straight to the backend's adapter: the field's get_db_prep_save
        is several calls deeper and a fifth of the write on a table with one datetime column."""
        if column.kind == "datetime":
            return conn.ops.adapt_datetimefield_value
        if column.kind in _PREP_KINDS:
            return functools.partial(column.field.get_db_prep_save, connection=conn)
        return None

    def _types(self, conn: Any, alias: str) -> list[int] | None:
        """The column type oids for binary COPY, or None to use bulk_create (a type psycopg cannot
        dump in binary, or a JSON field with an encoder of its own)."""
        if alias in self._copy_types:
            return self._copy_types[alias]
        from psycopg import adapters, pq

        types: list[int] | None = None
        with conn.cursor() as cur:
            cur.execute("SELECT a.attname, a.atttypid FROM pg_attribute a WHERE a.attrelid = %s::regclass "
                        "AND a.attnum > 0 AND NOT a.attisdropped", [conn.ops.quote_name(self.model._meta.db_table)])
            by_name = {name: int(oid) for name, oid in cur.fetchall()}
        try:
            types = [by_name[c.field.column] for c in self.columns]
            for oid in types:
                adapters.get_dumper_by_oid(oid, pq.Format.BINARY)
            if any(c.kind == "json" and getattr(c.field, "encoder", None) is not None for c in self.columns):
                types = None
        except Exception as exc:  # noqa: BLE001 - KeyError, psycopg.ProgrammingError: no binary dumper
            log.info("model route %s: bulk_create instead of COPY (%s: %s)", self.model._meta.label,
                     type(exc).__name__, exc)
            types = None
        self._copy_types[alias] = types
        return types
