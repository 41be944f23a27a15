"""Counters shared by the network thread, the dispatcher and the status writer.

Plain attributes: each is written by one thread only and read by the status writer, so the GIL
is all the synchronisation needed (a reader may see a value one message old).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Stats:
    received: int = 0
    handled: int = 0              # messages whose batch committed
    acked: int = 0
    dead_letters: int = 0
    duplicates_skipped: int = 0
    unrouted: int = 0
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

    def as_dict(self) -> dict:
        return asdict(self)
