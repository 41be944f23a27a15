"""Where failed messages go: ``DeadLetter`` rows in the tenant database (inside the batch
transaction), or ``LOG_ROOT/NAME/deadletter.jsonl`` when the mqttd app is not installed (fsynced
after the commit and before the ack)."""
from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .message import Message


@dataclass
class Letter:
    msg: Message
    route: str
    error: str
    traceback: str = ""


def model_available() -> bool:
    from django.apps import apps

    return apps.is_installed("mqttd.django")


class DeadLetterSink:
    def __init__(self, jsonl_path: Path, use_model: bool) -> None:
        self.jsonl_path = jsonl_path
        self.use_model = use_model

    def in_transaction(self, letters: list[Letter]) -> None:
        """Write letters inside the caller's transaction (model mode)."""
        if not letters or not self.use_model:
            return
        from .django.models import DeadLetter

        DeadLetter.objects.bulk_create([
            DeadLetter(topic=lt.msg.topic, payload=lt.msg.payload, route=lt.route, qos=lt.msg.qos,
                       properties=_jsonable(lt.msg.properties), error=lt.error[:10000],
                       traceback=lt.traceback[-20000:])
            for lt in letters
        ])

    def after_commit(self, letters: list[Letter]) -> None:
        """Append letters to the jsonl file and fsync (file mode). Raises OSError on failure."""
        if not letters or self.use_model:
            return
        self.jsonl_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        lines = "".join(json.dumps({
            "time": time.time(), "topic": lt.msg.topic, "route": lt.route, "qos": lt.msg.qos,
            "payload_b64": base64.b64encode(lt.msg.payload).decode("ascii"),
            "error": lt.error, "traceback": lt.traceback, "attempts": 1,
        }) + "\n" for lt in letters)
        fd = os.open(self.jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, lines.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def _jsonable(props: dict) -> dict:
    out = {}
    for k, v in props.items():
        if isinstance(v, bytes):
            v = base64.b64encode(v).decode("ascii")
        out[k] = v
    return out
