"""The built-in ``mqttd.inbox`` handler: store raw messages as ``InboxMessage`` rows.

It is the fastest route mqttd has, so it skips the ORM's per-object work: PostgreSQL gets one
binary ``COPY`` per batch, SQLite one ``executemany``; other backends use ``bulk_create``. All of
them run on the batch's connection, inside the batch transaction, like any handler.
"""
from __future__ import annotations

import datetime as dt

from mqttd.message import Message

_UTC = dt.UTC
_COLUMNS = ("topic", "payload", "qos", "retain", "received_at")


def inbox(msgs: list[Message]) -> None:
    from django.db import connections, router

    from mqttd.django.models import InboxMessage

    conn = connections[router.db_for_write(InboxMessage)]
    table = conn.ops.quote_name(InboxMessage._meta.db_table)
    cols = ", ".join(conn.ops.quote_name(c) for c in _COLUMNS)
    when = dt.datetime.fromtimestamp
    if conn.vendor == "postgresql" and hasattr(conn.connection, "pgconn"):   # psycopg 3
        with conn.cursor() as cur:
            with cur.cursor.copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "bytea", "int2", "bool", "timestamptz"])
                for m in msgs:
                    copy.write_row((m.topic, m.payload, m.qos, m.retain, when(m.received_at, _UTC)))
        return
    if conn.vendor == "sqlite":
        adapt = conn.ops.adapt_datetimefield_value
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} ({cols}) VALUES (%s, %s, %s, %s, %s)",
                            [(m.topic, m.payload, m.qos, m.retain, adapt(when(m.received_at, _UTC))) for m in msgs])
        return
    InboxMessage.objects.bulk_create(
        [InboxMessage(topic=m.topic, payload=m.payload, qos=m.qos, retain=m.retain,
                      received_at=when(m.received_at, _UTC)) for m in msgs],
        batch_size=1000,
    )


inbox.mqttd_batch = True  # type: ignore[attr-defined]
