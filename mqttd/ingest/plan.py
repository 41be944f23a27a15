"""Before a batch's transaction: which route runs on which message (units), the messages set
aside whole, and the typed payload step. Pure Python, no database work (mqttd.ingest.batch runs
what this plans)."""
from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from mqttd.ingest.deadletters import Letter
from mqttd.message import UNPREPARED, Message, PayloadError
from mqttd.router import Route, Router

log = logging.getLogger("mqttd.dispatch")

# One handler run: (the message as received, its route, the message the handler gets: the same
# object, or a copy carrying this route's params when the message matched several routes).
Unit = tuple[Message, Route, Message]


@dataclass
class BatchResult:
    """What one committed batch did: the dispatcher turns it into acks and counters."""

    letters: list[Letter] = field(default_factory=list)   # committed with the batch (or for the file)
    to_file: list[Letter] = field(default_factory=list)   # to deadletter.jsonl after the commit
    duplicates: int = 0
    builtin: int = 0               # canary messages (not tenant traffic)
    unrouted: int = 0
    last_user_msg: Message | None = None


def letter_for(msg: Message, route: Route, exc: BaseException) -> Letter:
    """The dead letter of ``route`` failing on ``msg`` with ``exc`` (logged)."""
    log.warning("handler %s failed on %s: %s: %s", route.name, msg.topic, type(exc).__name__, exc)
    tb = "".join(traceback.format_exception(exc))
    return Letter(msg, route.name, f"{type(exc).__name__}: {exc}", tb)


def plan(batch: list[Message], router: Router, set_aside: Callable[[Message], str | None],
         result: BatchResult) -> tuple[list[Unit], list[Letter]]:
    """Route every message. One set aside whole (``set_aside`` gives the reason: known poison,
    payload over max_payload) gives a dead letter for each route it matched; a message matching
    several routes is a unit per route. Then the typed payload step (``prepare``)."""
    units: list[Unit] = []
    letters: list[Letter] = []
    for msg in batch:
        matches = router.match(msg.topic)
        if not matches:
            result.unrouted += 1
            continue
        if matches[0][0].builtin and len(matches) == 1:
            result.builtin += 1          # the canary: not tenant traffic, not in handled/rates
        else:
            result.last_user_msg = msg
        reason = set_aside(msg)
        if reason is not None:
            letters += [Letter(msg, route.name, reason) for route, _ in matches if not route.builtin]
            continue
        if len(matches) == 1:
            msg.params = matches[0][1]
            units.append((msg, matches[0][0], msg))
        else:
            units += [(msg, route, msg.with_params(params)) for route, params in matches]
    return prepare(units, letters), letters


def prepare(units: list[Unit], letters: list[Letter]) -> list[Unit]:
    """Decode the payload of every unit whose route wants it typed (a typed parameter, a model
    route's row: mqttd.ingest.typed) before any handler runs: one that does not validate is a
    dead letter on its own (``PayloadError`` naming the field), and its neighbours, in a
    batch=True call too, go on to the handler. The value is kept on the handler's message, so a
    batch run again (an outage, the careful pass) does not decode it again."""
    if not any(route.payload is not None for _, route, _ in units):
        return units
    kept: list[Unit] = []
    for unit in units:
        msg, route, hmsg = unit
        if route.payload is not None and hmsg.prepared is UNPREPARED:
            try:
                hmsg.prepared = route.payload.decode(hmsg)
            except Exception as exc:  # noqa: BLE001 - PayloadError, or a validator of the tenant's raising
                letter = letter_for(msg, route, exc)
                if isinstance(exc, PayloadError):
                    letter.traceback = ""           # the error says it all; no mqttd frames
                letters.append(letter)
                continue
        kept.append(unit)
    return kept
