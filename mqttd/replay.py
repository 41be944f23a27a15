"""``mqttd replay``: run dead letters again through their routes (safe while the daemon runs).

Each letter runs in its own transaction: on success the row is deleted in that transaction; on
failure its attempts and error are updated. Letters live in the DB, so there is no broker and no
ack involved.
"""
from __future__ import annotations

import datetime as dt
import traceback

from .config import Config
from .errors import EXIT_OK, ConfigError, MqttdError
from .identity import Identity
from .message import Message
from .topics import TopicFilter


def replay(identity: Identity, config: Config, ids: list[int] | None = None, topic: str | None = None,
           since: str | None = None, dry_run: bool = False) -> int:
    from . import tenant
    from .daemon import build_router

    tenant.setup(config)
    from .deadletters import model_available

    if not model_available():
        raise ConfigError("replay needs the mqttd.django app in INSTALLED_APPS; dead letters are in "
                          f"{identity.deadletter_file}", key="INSTALLED_APPS")
    from django.db import transaction

    from .django.models import DeadLetter

    router = build_router(identity, config)
    qs = DeadLetter.objects.order_by("id")
    if ids:
        qs = qs.filter(id__in=ids)
    if since:
        try:
            when = dt.datetime.fromisoformat(since)
        except ValueError:
            raise MqttdError(f"mqttd replay: --since {since!r} is not an ISO date/time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        qs = qs.filter(created_at__gte=when)
    flt = TopicFilter.parse(topic) if topic else None
    done = failed = 0
    for letter_id in list(qs.values_list("id", flat=True)):
        with transaction.atomic():
            letter = DeadLetter.objects.select_for_update().filter(id=letter_id).first()
            if letter is None or (flt and flt.match(letter.topic) is None):
                continue
            msg = Message(letter.topic, bytes(letter.payload), letter.qos, properties=letter.properties or {})
            routes = [(r, p) for r, p in router.match(letter.topic) if not letter.route or r.name == letter.route]
            if not routes:
                routes = router.match(letter.topic)
            if dry_run:
                print(f"would replay #{letter.id} {letter.topic} via {', '.join(r.name for r, _ in routes) or 'no route'}")
                continue
            error = None
            try:
                with transaction.atomic():
                    if not routes:
                        raise LookupError(f"no route matches {letter.topic}")
                    for route, params in routes:
                        m = msg.with_params(params)
                        route.handler([m]) if route.batch else route.handler(m, **params)
            except Exception as exc:  # noqa: BLE001
                error = (f"{type(exc).__name__}: {exc}", traceback.format_exc())
            if error is None:
                letter.delete()
                done += 1
                print(f"replayed #{letter_id} {letter.topic}: ok, deleted")
            else:
                letter.attempts += 1
                letter.error, letter.traceback = error[0][:10000], error[1][-20000:]
                letter.save(update_fields=["attempts", "error", "traceback", "updated_at"])
                failed += 1
                print(f"replayed #{letter_id} {letter.topic}: failed again ({error[0]}), attempts {letter.attempts}")
    print(f"replay: {done} succeeded, {failed} failed")
    return EXIT_OK if failed == 0 else 1
