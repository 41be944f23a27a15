"""Gap detection, the daemon's side (docs/operations.md): which ``mqttd-seq`` numbers of each publisher id
arrived, and how many are still missing after the settle window (``publisher_gaps``).

Recording (``GapRecorder.record``) runs inside the transaction that commits the batch (a hook in
``mqttd.ingest.batch``), so a batch rolled back records nothing. What arrived is kept as ranges
``first..last`` per (project, publisher id) in ``PublisherRange``: a steady publisher is one row,
whatever its rate. Per batch: the stamps grouped into ranges in memory, then per publisher id
touched one UPDATE when the batch continues a stored range (the steady state), else one SELECT
of the rows that could merge with them (``FOR UPDATE`` on PostgreSQL: two instances merging the
same publisher wait for each other; SQLite serialises writers anyway) and a write only when
something changed. A redelivered message changes nothing (ranges are idempotent).

Counting (``holes`` here; when to count: ``mqttd.ingest.gapcount``) runs in a thread of its own,
never in the batch, from the table (so every instance of a project reports the same number): a hole
between two ranges of a publisher counts once the range after it first arrived more than
``gap_settle_s`` ago; a hole filled later (a late redelivery) stops counting. Not counted, because
nothing can tell them from messages never meant for this daemon: numbers before the first one seen
of a publisher (it published before this project subscribed), and numbers after the last one seen
(dropped at the end of a stream: seen once that publisher sends again).
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from mqttd.message import Message
from mqttd.mqtt import stamp

log = logging.getLogger("mqttd.gaps")

Range = tuple[int, int]


def ranges_of(seqs: Iterable[int]) -> list[Range]:
    """Sorted, merged ``(first, last)`` ranges of sequence numbers (duplicates allowed)."""
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return [(a, b) for a, b in out]


def stamps_by_pub(batch: Sequence[Message]) -> dict[str, list[Range]]:
    """The batch's stamps as ranges per publisher id (messages without a stamp are skipped)."""
    seqs: dict[str, list[int]] = {}
    for msg in batch:
        if not msg.has_properties:
            continue
        props = msg.user_properties
        if not props:
            continue
        got = stamp.read(props)
        if got is not None:
            seqs.setdefault(got[0], []).append(got[1])
    return {pub: ranges_of(s) for pub, s in seqs.items()}


@dataclass
class Row:
    """One stored range (``id`` None for one to insert)."""

    id: int | None
    first: int
    last: int
    first_seen_at: dt.datetime


@dataclass
class Merge:
    """What a merge changes: rows to update (changed bounds or time), ids to delete, rows to insert."""

    update: list[Row]
    delete: list[int]
    insert: list[Row]


def merge(stored: Sequence[Row], new: Sequence[Range], now: dt.datetime) -> Merge:
    """Merge ``new`` ranges into the ``stored`` rows they overlap or touch. Each merged range reuses
    the first stored row in it (updated only if it changed); the other rows in it are deleted; a
    merged range with no stored row is inserted. Its ``first_seen_at`` is the earliest of what it
    absorbed: the hole before it has been open since then."""
    items = sorted([(r.first, r.last, r.first_seen_at, r) for r in stored]
                   + [(a, b, now, None) for a, b in new], key=lambda t: (t[0], t[3] is None))
    result = Merge([], [], [])
    groups: list[list[tuple[int, int, dt.datetime, Row | None]]] = []
    hi = None
    for item in items:
        if groups and hi is not None and item[0] <= hi + 1:
            groups[-1].append(item)
            hi = max(hi, item[1])
        else:
            groups.append([item])
            hi = item[1]
    for group in groups:
        first = min(g[0] for g in group)
        last = max(g[1] for g in group)
        seen = min(g[2] for g in group)
        rows = [g[3] for g in group if g[3] is not None]
        if not rows:
            result.insert.append(Row(None, first, last, seen))
            continue
        keep, *drop = rows
        result.delete += [r.id for r in drop if r.id is not None]
        if (keep.first, keep.last, keep.first_seen_at) != (first, last, seen) or drop:
            result.update.append(Row(keep.id, first, last, seen))
    return result


@dataclass
class Holes:
    """What ``holes`` found: ``gaps`` missing numbers already settled, and ``next_settle``, the
    arrival time of the earliest hole still inside its settle window (None: no such hole)."""

    gaps: int
    next_settle: dt.datetime | None


def holes(rows: Iterable[tuple[str, int, int, dt.datetime]], settled_before: dt.datetime) -> Holes:
    """Missing numbers between the ranges of each publisher, ``rows`` ordered by (pub, first):
    a hole counts once the range after it first arrived before ``settled_before``. Overlapping
    rows (two instances inserted the same numbers at once) count once."""
    total, pub, hi = 0, None, 0
    pending: dt.datetime | None = None
    for p, first, last, seen in rows:
        if p != pub:
            pub, hi = p, last
            continue
        if first > hi + 1:
            if seen <= settled_before:
                total += first - hi - 1
            elif pending is None or seen < pending:
                pending = seen
        hi = max(hi, last)
    return Holes(total, pending)


class GapRecorder:
    """Records the stamps of committed batches for ``project`` (see the module docstring)."""

    def __init__(self, project: str, on_commit: Callable[[], None] | None = None) -> None:
        self.project = project
        self.on_commit = on_commit       # GapCounter.nudge: recount once the batch has committed

    def record(self, batch: Sequence[Message]) -> None:
        """Inside the batch's transaction: merge its stamps into the table."""
        by_pub = stamps_by_pub(batch)
        if not by_pub:
            return
        from django.db import transaction
        from django.utils import timezone

        if self.on_commit is not None:
            transaction.on_commit(self.on_commit)

        now = timezone.now()
        for pub in sorted(by_pub):           # one lock order for every instance: no deadlock
            self._merge_pub(pub, by_pub[pub], now)

    def _merge_pub(self, pub: str, new: list[Range], now: dt.datetime) -> None:
        from mqttd.django.models import PublisherRange

        lo, hi = new[0][0], new[-1][1]
        if len(new) == 1 and PublisherRange.objects.filter(
                project=self.project, pub=pub, first__lte=lo, last__gte=lo - 1, last__lt=hi).update(last=hi, last_seen_at=now):
            # The steady state, one query: the batch continues a stored range. (A row overlapping
            # the new numbers may remain: counted once, folded by the next full merge.)
            return
        qs = (PublisherRange.objects.select_for_update()
              .filter(project=self.project, pub=pub, last__gte=lo - 1, first__lte=hi + 1).order_by("first"))
        stored = [Row(*t) for t in qs.values_list("id", "first", "last", "first_seen_at")]
        if len(stored) == 1 and len(new) == 1 and stored[0].first <= lo and stored[0].last >= hi:
            return                           # the common redelivery: already recorded
        change = merge(stored, new, now)
        if change.delete:
            PublisherRange.objects.filter(id__in=change.delete).delete()
        for row in change.update:
            PublisherRange.objects.filter(id=row.id).update(first=row.first, last=row.last,
                                                            first_seen_at=row.first_seen_at, last_seen_at=now)
        if change.insert:
            PublisherRange.objects.bulk_create([
                PublisherRange(project=self.project, pub=pub, first=r.first, last=r.last,
                               first_seen_at=r.first_seen_at, last_seen_at=now)
                for r in change.insert])

    def any_stamped(self, batch: Sequence[Message]) -> bool:
        """Does the batch carry a stamp (so a batch with nothing else to commit still records)?"""
        return any(m.has_properties and stamp.PUB_KEY in m.user_properties for m in batch)
