"""Messages whose handler hung: remembered across the restart that un-hangs the process.

A Python thread cannot be killed, so when a handler call runs past ``dispatch.handler_timeout`` the
watchdog records the handler call in flight here (RUN_DIR/NAME.poison.json) and exits non-zero;
Supervisor restarts the process, the broker redelivers the un-acked batch, and:
- a message that hung on its own is stored as a dead letter without running its handler again;
- the messages of a ``batch=True`` call that hung are *suspects*: each runs alone, so a second
  hang names the culprit and its innocent neighbours are stored normally.
Records older than a day are dropped (their message may never come back).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mqttd.message import Message

MAX_AGE_S = 86400


def fingerprint(msg: Message) -> str:
    return hashlib.sha256(msg.topic.encode("utf-8", "replace") + b"\0" + msg.payload).hexdigest()


@dataclass
class Record:
    route: str
    topic: str
    fingerprint: str
    alone: bool          # it hung while running alone: it is the culprit
    at: float
    timeout: float


class PoisonList:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, Record] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        now = time.time()
        for r in data if isinstance(data, list) else []:
            try:
                rec = Record(**r)
            except TypeError:
                continue
            if now - rec.at < MAX_AGE_S:
                self.records[rec.fingerprint] = rec

    def __bool__(self) -> bool:
        return bool(self.records)

    def lookup(self, msg: Message) -> Record | None:
        return self.records.get(fingerprint(msg)) if self.records else None

    def record_hang(self, msgs: list[Message], route: str, timeout: float) -> None:
        now = time.time()
        alone = len(msgs) == 1
        for m in msgs:
            fp = fingerprint(m)
            self.records[fp] = Record(route, m.topic, fp, alone, now, timeout)
        self._save()

    def forget(self, msgs: list[Message]) -> None:
        if not self.records:
            return
        changed = False
        for m in msgs:
            if self.records.pop(fingerprint(m), None) is not None:
                changed = True
        if changed:
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        with os.fdopen(fd, "w") as f:
            json.dump([vars(r) for r in self.records.values()], f)
        os.replace(tmp, self.path)
