"""``mqttd replay``: run dead letters again through their routes (safe while the daemon runs).

Each letter runs in its own transaction, under the same rules as the daemon's batches: its
dedupe key is checked and recorded in that transaction (a letter whose key is already recorded
is resolved as a duplicate without running the handler), and a handler that breaks the handler
contract fails. On success the row is deleted in that transaction; on failure its attempts and
error are updated. Letters live in the database, so there is no broker and no ack involved.
``replay_letter`` is what the Django admin's *Replay selected* action calls too.
"""
from __future__ import annotations

import datetime as dt
import traceback
from dataclasses import dataclass

from mqttd.config import Config
from mqttd.django.db import TxGuard, is_outage
from mqttd.errors import EXIT_OK, EXIT_UNHEALTHY, ConfigError, HandlerContractError, MqttdError
from mqttd.identity import Identity
from mqttd.ingest.dedupe import Deduper
from mqttd.message import Message
from mqttd.router import Router
from mqttd.topics import TopicFilter


@dataclass
class Outcome:
    status: str                 # "replayed", "duplicate" (key already recorded) or "failed"
    topic: str
    routes: list[str]
    error: str | None = None
    attempts: int = 0


def replay_letter(letter_id: int, router: Router, deduper: Deduper) -> Outcome | None:
    """Run dead letter ``letter_id`` again; None if it is gone (replayed or discarded meanwhile)."""
    from django.db import transaction

    from mqttd.django.models import DeadLetter

    error: tuple[str, str] | None = None
    lost = False
    with transaction.atomic():
        letter = DeadLetter.objects.select_for_update().filter(id=letter_id).first()
        if letter is None:
            return None
        msg = Message(letter.topic, bytes(letter.payload), letter.qos, properties=letter.properties or {})
        matches = router.match(letter.topic)
        routes = [(r, p) for r, p in matches if r.name == letter.route] or matches
        names = [r.name for r, _ in routes]
        units = [(msg, r, msg.with_params(p)) for r, p in routes]
        guard = TxGuard()
        try:
            with transaction.atomic():
                guard.begin()
                if not routes:
                    raise LookupError(f"no route matches {letter.topic}")
                deduper.reset()              # its verdicts are per batch: one letter here
                kept, _, keys = deduper.filter(units)
                for _, route, m in kept:
                    guard.call(route, [m])
                deduper.record(keys)
                guard.before_commit()
        except Exception as exc:  # noqa: BLE001 - every handler error is the letter's
            if is_outage(exc):
                raise MqttdError(f"mqttd replay: database unavailable: {exc}") from None
            error = (f"{type(exc).__name__}: {exc}", traceback.format_exc())
            lost = isinstance(exc, HandlerContractError) and exc.lost
        if error is None:
            letter.delete()
            return Outcome("duplicate" if not kept else "replayed", letter.topic, names)
        if not lost:
            return _failed(letter, error, names)
    # The handler destroyed the transaction: record the failure in a fresh one.
    with transaction.atomic():
        letter = DeadLetter.objects.select_for_update().filter(id=letter_id).first()
        return _failed(letter, error, names) if letter is not None else None


def _failed(letter, error: tuple[str, str], routes: list[str]) -> Outcome:  # noqa: ANN001 - a DeadLetter
    from mqttd.ingest.deadletters import MAX_ERROR, MAX_TRACEBACK, storable

    letter.attempts += 1
    letter.error, letter.traceback = storable(error[0][:MAX_ERROR]), storable(error[1][-MAX_TRACEBACK:])
    letter.save(update_fields=["attempts", "error", "traceback", "updated_at"])
    return Outcome("failed", letter.topic, routes, error[0], letter.attempts)


def replay(identity: Identity, config: Config, ids: list[int] | None = None, topic: str | None = None,
           since: str | None = None, dry_run: bool = False) -> int:
    from mqttd.daemon import tenant
    from mqttd.daemon.run import build_router

    tenant.setup(config)
    from mqttd.ingest.deadletters import model_available

    if not model_available():
        raise ConfigError("replay needs the mqttd.django app in INSTALLED_APPS; dead letters are in "
                          f"{identity.deadletter_file}", key="INSTALLED_APPS")
    from mqttd.django.models import DeadLetter

    router = build_router(identity, config)
    deduper = Deduper(True, config.dispatch.dedupe_property)
    qs = DeadLetter.objects.order_by("id")
    if ids:
        qs = qs.filter(id__in=ids)
    if since:
        try:
            when = dt.datetime.fromisoformat(since)
        except ValueError:
            raise MqttdError(f"mqttd replay: --since {since!r} is not an ISO date/time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        qs = qs.filter(created_at__gte=when)
    flt = TopicFilter.parse(topic) if topic else None
    done = failed = 0
    for letter_id, letter_topic, route in list(qs.values_list("id", "topic", "route")):
        if flt and flt.match(letter_topic) is None:
            continue
        if dry_run:
            names = [r.name for r, _ in router.match(letter_topic) if not route or r.name == route]
            print(f"would replay #{letter_id} {letter_topic} via {', '.join(names) or 'no route'}")
            continue
        out = replay_letter(letter_id, router, deduper)
        if out is None:
            continue
        if out.status == "failed":
            failed += 1
            print(f"replayed #{letter_id} {out.topic}: failed again ({out.error}), attempts {out.attempts}")
        else:
            done += 1
            how = "ok" if out.status == "replayed" else "duplicate (its dedupe key is already recorded)"
            print(f"replayed #{letter_id} {out.topic}: {how}, deleted")
    print(f"replay: {done} succeeded, {failed} failed")
    return EXIT_OK if failed == 0 else EXIT_UNHEALTHY
