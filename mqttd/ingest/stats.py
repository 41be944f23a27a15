"""Counters shared by the network thread, the dispatcher and the status writer, and the
accounting that makes them add up (docs/operations.md):

    received = handled + dead_letters + duplicates_skipped + unrouted + canary + in_flight

Every message the session puts into the intake is counted ``received`` (by the session). Once its
batch has committed and been handed to the acker, it is *settled* in exactly one outcome:

- ``canary``: our own canary, matched by no tenant route (not tenant traffic);
- ``unrouted``: matched no route at all (acked, nothing stored);
- ``dead_letters``: at least one of its routes set it aside as a dead letter (a message that
  matched two routes and failed in one is a dead letter, not handled: it needs an operator);
- ``duplicates_skipped``: every one of its routes skipped it by a known dedupe key;
- ``handled``: the rest (its handlers ran and committed).

``in_flight`` is not counted but derived, ``received`` minus everything settled, read under the
lock the dispatcher holds while it settles a batch: the messages in the intake, in the batch in
hand, and in a batch committed but not yet settled. So the identity holds in every snapshot, not
just on average. (A batch whose ack is dropped because its connection is gone is settled all the
same: it committed; the broker's redelivery is received, and settled, again.)

Other fields are plain attributes, each written by one thread and read by the status writer: the
GIL is all the synchronisation they need (a reader may see a value one message old).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mqttd.ingest.batch import BatchResult
    from mqttd.message import Message

# The outcome counters, in the order of the identity; ``in_flight`` completes it.
OUTCOMES = ("handled", "dead_letters", "duplicates_skipped", "unrouted", "canary")


@dataclass(frozen=True)
class Tally:
    """How the messages of one committed batch settled (each message counted once)."""

    handled: int = 0
    dead_letters: int = 0
    duplicates_skipped: int = 0
    unrouted: int = 0
    canary: int = 0


def tally(batch: list[Message], result: BatchResult, skipped: Mapping[int, Mapping[str, bool]]) -> Tally:
    """Settle every message of ``batch`` in one outcome. ``skipped`` is the deduper's verdict per
    message (by ``id``) and route name, from the pass that committed (``Deduper.verdicts``)."""
    letters = {id(letter.msg) for letter in result.letters}
    dups = sum(1 for key, routes in skipped.items() if routes and all(routes.values()) and key not in letters)
    handled = len(batch) - result.builtin - result.unrouted - len(letters) - dups
    return Tally(handled=handled, dead_letters=len(letters), duplicates_skipped=dups,
                 unrouted=result.unrouted, canary=result.builtin)


@dataclass
class Stats:
    handled: int = 0              # see the module docstring for the five outcomes
    dead_letters: int = 0
    duplicates_skipped: int = 0
    unrouted: int = 0
    canary: int = 0
    acked: int = 0
    batches: int = 0
    last_batch_size: int = 0
    last_message_at: float | None = None
    db_ok: bool | None = None     # None until the first batch
    db_error: str | None = None
    last_db_ok_at: float | None = None
    db_retries: int = 0
    canary_sent_at: float | None = None
    canary_at: float | None = None        # wall clock of the last completed round trip
    canary_rtt_ms: float | None = None
    deadletter_error: str | None = None   # deadletter.jsonl cannot be written: acks are held
    group_warning: str | None = None      # members of the shared group whose canary stopped (ingest.peers)

    def __post_init__(self) -> None:
        # Not a dataclass field (asdict would try to copy it): held while a batch is settled.
        self._settling = threading.Lock()

    def settle(self, t: Tally, acked: int, batch_size: int, last_message_at: float | None) -> None:
        """Count one committed, acked batch: all outcome counters move together."""
        with self._settling:
            for name in OUTCOMES:
                setattr(self, name, getattr(self, name) + getattr(t, name))
            self.acked += acked
            self.batches += 1
            self.last_batch_size = batch_size
            if last_message_at is not None:
                self.last_message_at = last_message_at

    @property
    def tenant_settled(self) -> int:
        """Tenant messages settled so far (what the rate counts): handled, dead letters, duplicates."""
        return self.handled + self.dead_letters + self.duplicates_skipped

    def accounts(self, received: Callable[[], int]) -> dict[str, Any]:
        """Every counter, plus ``received`` and the derived ``in_flight``, as of one instant.

        ``received()`` is read while the lock holds the settled counters still: it only grows,
        so ``in_flight`` is exact at that instant and never negative."""
        with self._settling:
            data = asdict(self)
            count = int(received())
        data["received"] = count
        data["in_flight"] = count - sum(data[name] for name in OUTCOMES)
        return data
