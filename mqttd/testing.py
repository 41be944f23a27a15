"""Run a message through a tenant's routes in its own test suite, without a broker (docs/handlers.md, "Testing your handlers").

``deliver(topic, payload, **properties)`` and ``deliver_many([...])`` hand messages to the very
pieces the daemon's dispatcher uses: the router built from the discovered ``@route`` handlers,
the ``Deduper``, the ``BatchRunner`` (one transaction per batch, a savepoint per failure) and the
dead-letter sink. What comes back says how each message settled, as the daemon's accounting would
count it (``mqttd.ingest.stats``)::

    from django.test import TestCase
    from mqttd.testing import deliver

    class TelemetryTests(TestCase):
        def test_a_reading_is_stored(self):
            out = deliver("ble/d1/telemetry", {"seq": 1, "rssi": -60})
            assert out.handled, out.error
            assert Reading.objects.get(device="d1").rssi == -60

Inside a Django ``TestCase`` the batch transaction is a savepoint of the test's transaction and
is rolled back with it, dead-letter rows and dedupe keys included. What is left out is the broker
and the ack: a message here is never retried. A database error that looks like an outage (the
daemon would hold the batch and retry it) is raised as ``mqttd.ingest.batch.DatabaseUnavailable``.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mqttd.message import Message
from mqttd.router import Route, Router

Kind = Literal["handled", "dead_letter", "duplicate", "unrouted"]
Payload = bytes | str | dict[str, Any] | list[Any]


@dataclass(frozen=True)
class Outcome:
    """How one delivered message settled."""

    topic: str
    kind: Kind
    routes: list[str] = field(default_factory=list)   # the routes it matched
    error: str | None = None                          # a dead letter's error ("ValueError: ...")
    traceback: str | None = None

    @property
    def handled(self) -> bool:
        return self.kind == "handled"

    @property
    def dead_letter(self) -> bool:
        return self.kind == "dead_letter"

    @property
    def duplicate(self) -> bool:
        """Skipped: its dedupe key was already recorded (or came earlier in the same batch)."""
        return self.kind == "duplicate"


def deliver(topic: str, payload: Payload, *, qos: int = 1, retain: bool = False,
            routes: Iterable[Route] | None = None, dedupe_property: str | None = None,
            max_payload: int = 0, **properties: Any) -> Outcome:
    """Deliver one message, as a batch of one. ``properties`` are MQTT 5 properties as the
    handler sees them in ``msg.properties``, e.g. ``UserProperty=[("msg-id", "42")]``."""
    return deliver_many([(topic, payload, properties)], qos=qos, retain=retain, routes=routes,
                        dedupe_property=dedupe_property, max_payload=max_payload)[0]


def deliver_many(messages: Sequence[tuple[str, Payload] | tuple[str, Payload, dict[str, Any]]], *, qos: int = 1,
                 retain: bool = False, routes: Iterable[Route] | None = None, dedupe_property: str | None = None,
                 max_payload: int = 0) -> list[Outcome]:
    """Deliver ``[(topic, payload), (topic, payload, properties), ...]`` as ONE batch: one
    transaction, ``batch=True`` handlers called once with their messages, a bad message set aside
    without rolling back its neighbours. One ``Outcome`` per message, in order.

    ``routes``: the routes to use (default: every ``@route`` of the installed apps' ``mqtt_handlers``
    modules); ``dedupe_property``: the config's ``dispatch.dedupe_property``; ``max_payload``:
    ``dispatch.max_payload``."""
    from mqttd.ingest.batch import BatchRunner
    from mqttd.ingest.deadletters import DeadLetterSink, model_available
    from mqttd.ingest.dedupe import Deduper

    router = Router(list(routes) if routes is not None else _discovered())
    use_model = model_available()
    sink = DeadLetterSink(_jsonl_path(), use_model)
    deduper = Deduper(use_model, dedupe_property)
    runner = BatchRunner(router, sink, max_payload=max_payload, deduper=deduper)
    now = time.time()
    batch = [Message(m[0], _encode(m[1]), qos, retain, mid=i + 1, received_at=now,
                     properties=dict(m[2]) if len(m) > 2 else {})
             for i, m in enumerate(messages)]
    result = runner.run(batch, blame=False)
    sink.to_file(result.to_file)        # the daemon does this after the commit, before the ack
    letters: dict[int, list[Any]] = {}
    for letter in result.letters:
        letters.setdefault(id(letter.msg), []).append(letter)
    out = []
    for msg in batch:
        names = [r.name for r, _ in router.match(msg.topic)]
        verdicts = deduper.verdicts.get(id(msg))
        if id(msg) in letters:
            first = letters[id(msg)][0]
            out.append(Outcome(msg.topic, "dead_letter", names, first.error, first.traceback or None))
        elif not names:
            out.append(Outcome(msg.topic, "unrouted"))
        elif verdicts and all(verdicts.values()):
            out.append(Outcome(msg.topic, "duplicate", names))
        else:
            out.append(Outcome(msg.topic, "handled", names))
    return out


def _discovered() -> list[Route]:
    from mqttd.router import discover, registered_routes

    discover()
    return registered_routes()


def _encode(payload: Payload) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload).encode("utf-8")


def _jsonl_path() -> Path:
    """Where letters go when the mqttd app is not installed (the daemon's LOG_ROOT/NAME/deadletter.jsonl)."""
    return Path(tempfile.gettempdir()) / "mqttd-testing-deadletter.jsonl"
