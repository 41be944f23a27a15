"""Where failed messages go: ``DeadLetter`` rows in the tenant database (inside the batch
transaction), or ``LOG_ROOT/NAME/deadletter.jsonl`` (fsynced after the commit and before the ack)
when the mqttd app is not installed, or for a letter that no row can hold.

Every dead letter can be stored: any topic MQTT allows, any payload, any error text. What the
database cannot take as it is (NUL characters in text, which PostgreSQL refuses) is escaped; a row
that still cannot be written goes to the file instead. A dead letter never wedges the stream.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mqttd.django.db import is_outage
from mqttd.message import Message

log = logging.getLogger("mqttd.dispatch")

MAX_ERROR = 10_000        # characters of the error kept in a row (the head: the message)
MAX_TRACEBACK = 20_000    # characters of the traceback kept (the tail: where it was raised)
MAX_ROUTE = 255           # the route column


@dataclass
class Letter:
    msg: Message
    route: str
    error: str
    traceback: str = ""


def model_available() -> bool:
    from django.apps import apps

    return apps.is_installed("mqttd.django")


def storable(text: str) -> str:
    """Text any database column takes: NUL (refused by PostgreSQL in text and JSON) escaped."""
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def _jsonable(value: Any) -> Any:
    """MQTT 5 properties as JSON: bytes as base64, text storable."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return storable(str(value))


class DeadLetterSink:
    def __init__(self, jsonl_path: Path, use_model: bool) -> None:
        self.jsonl_path = jsonl_path
        self.use_model = use_model

    def in_transaction(self, letters: list[Letter]) -> list[Letter]:
        """Write letters as rows inside the caller's transaction; return the letters that must go
        to the file after the commit instead (all of them in file mode).

        All rows in one savepoint; if that fails for a reason other than an outage, one savepoint
        per row, and a row the table still refuses goes to the file with the reason."""
        if not letters:
            return []
        if not self.use_model:
            return list(letters)
        from django.db import transaction

        from mqttd.django.models import DeadLetter

        try:
            with transaction.atomic():
                DeadLetter.objects.bulk_create([self._row(lt) for lt in letters])
            return []
        except Exception as exc:
            if is_outage(exc):
                raise
        overflow = []
        for lt in letters:
            try:
                with transaction.atomic():
                    DeadLetter.objects.bulk_create([self._row(lt)])
            except Exception as exc:
                if is_outage(exc):
                    raise
                log.error("dead letter for %s cannot be stored as a row (%s: %s); writing it to %s",
                          lt.msg.topic[:200], type(exc).__name__, exc, self.jsonl_path)
                overflow.append(replace(lt, error=f"{lt.error} [not stored as a DeadLetter row: "
                                                  f"{type(exc).__name__}: {exc}]"))
        return overflow

    @staticmethod
    def _row(lt: Letter) -> Any:
        from mqttd.django.models import DeadLetter

        return DeadLetter(topic=storable(lt.msg.topic), payload=lt.msg.payload, route=lt.route[:MAX_ROUTE],
                          qos=lt.msg.qos, properties=_jsonable(lt.msg.properties),
                          error=storable(lt.error[:MAX_ERROR]), traceback=storable(lt.traceback[-MAX_TRACEBACK:]))

    def to_file(self, letters: list[Letter]) -> None:
        """Append letters to the jsonl file and fsync. Raises OSError on failure (the caller then
        holds the batch's acks and tries again: a letter is never acked before it is stored)."""
        if not letters:
            return
        self.jsonl_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        lines = "".join(json.dumps({
            "time": time.time(), "topic": lt.msg.topic, "route": lt.route, "qos": lt.msg.qos,
            "payload_b64": base64.b64encode(lt.msg.payload).decode("ascii"),
            "properties": _jsonable(lt.msg.properties),
            "error": lt.error, "traceback": lt.traceback, "attempts": 1,
        }) + "\n" for lt in letters)
        fd = os.open(self.jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            data = lines.encode("utf-8", "surrogatepass")
            while data:
                written = os.write(fd, data)
                data = data[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
