"""Exactly-once effect, opt-in: (route, key) pairs recorded in the batch transaction.

A route's ``dedupe=fn(msg)`` key, or the MQTT 5 user property named by
``dispatch.dedupe_property``, is looked up before the handler runs (``filter``) and inserted after
it succeeded (``record``), in the same transaction as the handler's writes; a redelivery with a
known key is acked without running the handler again. Recording *after* the handlers means a key
is never committed without its effect, even if a handler ends the transaction behind mqttd's
back. The unique constraint on (route, key) makes two instances racing on one key fail one
savepoint, not the batch.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from mqttd.message import Message
from mqttd.router import Route

if TYPE_CHECKING:          # defined once, beside the batch runner (which imports this module)
    from mqttd.ingest.batch import Unit

MAX_KEY = 255


def normalise(key: Any) -> str:
    """Keys that do not fit the column are stored as their SHA-256, never truncated (which could
    make two different messages look like one)."""
    text = str(key)
    if len(text) <= MAX_KEY:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Deduper:
    def __init__(self, enabled: bool, property_name: str | None = None) -> None:
        self.enabled = enabled
        self.property_name = property_name
        # Per message (by id, as received) and route name: was that unit skipped as a duplicate?
        # Each ``filter`` overwrites the verdicts of the units it is given, and the batch runner
        # filters every unit again in the pass that commits (a rolled-back span runs again), so
        # after a commit these are that pass's verdicts. The owner calls ``reset`` per attempt.
        # Read by the accounting (``mqttd.ingest.stats.tally``) and by ``mqttd.testing``.
        self.verdicts: dict[int, dict[str, bool]] = {}

    def reset(self) -> None:
        self.verdicts = {}

    def key(self, msg: Message, route: Route) -> str | None:
        """The message's key for this route. A failing key function raises (a handler error)."""
        if route.dedupe is not None:
            key = route.dedupe(msg)
        elif self.property_name and not route.builtin:
            key = msg.user_properties.get(self.property_name)
        else:
            return None
        return None if key is None else normalise(key)

    def filter(self, units: list[Unit]) -> tuple[list[Unit], int, list[tuple[str, str]]]:
        """Units whose key is not recorded yet, the duplicates count, and the (route, key) pairs
        of the kept units, to ``record`` once their handlers have run."""
        if not self.enabled:
            return units, 0, []
        # msg: the message as this route's handler gets it (its params)
        unit_keys = [self.key(msg, route) for _, route, msg in units]
        if not any(k is not None for k in unit_keys):
            # Nothing keyed (the common batch: no dedupe on these routes): nothing skipped, and no
            # verdict to record (a message without one is not a duplicate: mqttd.ingest.stats.tally).
            # Per-unit verdicts here cost the inbox route ~10% of its rate (scripts/bench --baseline).
            return units, 0, []
        keyed: dict[tuple[str, str], int] = {}
        keep: list[Unit] = []
        dup = 0
        verdicts = self.verdicts
        for unit, key in zip(units, unit_keys, strict=True):
            received, route, _ = unit
            skipped = False
            if key is None:
                keep.append(unit)
            elif (route.name, key) in keyed:
                dup += 1                       # the same message twice in one batch
                skipped = True
            else:
                keyed[(route.name, key)] = len(keep)
                keep.append(unit)
            verdicts.setdefault(id(received), {})[route.name] = skipped
        if not keyed:
            return keep, dup, []
        from mqttd.django.models import ProcessedKey

        by_route: dict[str, list[str]] = {}
        for rname, key in keyed:
            by_route.setdefault(rname, []).append(key)
        known: set[tuple[str, str]] = set()
        for rname, keys in by_route.items():
            known.update((rname, k) for k in
                         ProcessedKey.objects.filter(route=rname, key__in=keys).values_list("key", flat=True))
        if known:
            drop = {keyed[k] for k in known}
            dup += len(drop)
            for i in drop:
                verdicts[id(keep[i][0])][keep[i][1].name] = True
            keep = [u for i, u in enumerate(keep) if i not in drop]
        return keep, dup, [rk for rk in keyed if rk not in known]

    @staticmethod
    def record(keys: list[tuple[str, str]]) -> None:
        """Insert the keys of units whose handlers succeeded, in the caller's transaction."""
        if keys:
            from mqttd.django.models import ProcessedKey

            ProcessedKey.objects.bulk_create([ProcessedKey(route=r, key=k) for r, k in keys])
