"""Exactly-once effect, opt-in (SPEC §6): (route, key) pairs recorded in the batch transaction.

A route's ``dedupe=fn(msg)`` key, or the MQTT 5 user property named by
``dispatch.dedupe_property``, is looked up and inserted in the same transaction as the handler's
writes; a redelivery with a known key is acked without running the handler again. The unique
constraint on (route, key) makes two instances racing on one key fail one savepoint, not the batch.
"""
from __future__ import annotations

import hashlib
from typing import Any

from .message import Message
from .router import Route

Unit = tuple[Message, Route, dict]
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

    def key(self, msg: Message, route: Route) -> str | None:
        """The message's key for this route. A failing key function raises (a handler error)."""
        if route.dedupe is not None:
            key = route.dedupe(msg)
        elif self.property_name and not route.builtin:
            key = msg.user_properties.get(self.property_name)
        else:
            return None
        return None if key is None else normalise(key)

    def filter(self, units: list[Unit]) -> tuple[list[Unit], int]:
        """Units whose key is new (recorded now, in the caller's transaction), and the duplicates count."""
        if not self.enabled:
            return units, 0
        keyed: dict[tuple[str, str], int] = {}
        keep: list[Unit] = []
        dup = 0
        for unit in units:
            msg, route, _ = unit
            key = self.key(msg, route)
            if key is None:
                keep.append(unit)
            elif (route.name, key) in keyed:
                dup += 1                       # the same message twice in one batch
            else:
                keyed[(route.name, key)] = len(keep)
                keep.append(unit)
        if not keyed:
            return keep, dup
        from .django.models import ProcessedKey

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
            keep = [u for i, u in enumerate(keep) if i not in drop]
        ProcessedKey.objects.bulk_create([ProcessedKey(route=r, key=k) for r, k in keyed if (r, k) not in known])
        return keep, dup
