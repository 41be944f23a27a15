"""The dispatcher thread: batches from the intake -> the tenant's ORM -> acks after commit.

Per batch (docs/delivery.md, 'Batches'):
1. ``close_old_connections()`` (nothing else in a daemon does it; a dead connection is never
   reopened by Django on its own).
2. ``BatchRunner.run``: every handler in one transaction, bad messages set aside as dead
   letters (``mqttd.batch``).
3. After the commit, and after the dead letters bound for ``deadletter.jsonl`` are fsynced (file
   mode, or a letter no row can hold; retried until it works): ack every message of the batch, in
   arrival order, on the connection that delivered it. Nothing after the commit can fail the
   batch: a broken after-commit hook or poison-list file is logged, never raised.
A database outage (OperationalError / InterfaceError) is never a dead letter: nothing is acked,
the batch is retried with backoff until the database is back, and the process stays up.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from mqttd.django.db import QueryClock, close_broken, db_answers
from mqttd.ingest.batch import BatchResult, BatchRunner, DatabaseUnavailable
from mqttd.ingest.deadletters import DeadLetterSink
from mqttd.ingest.dedupe import Deduper
from mqttd.ingest.intake import Intake
from mqttd.ingest.poison import PoisonList
from mqttd.ingest.stats import Stats, tally
from mqttd.message import Message
from mqttd.router import Route, Router

log = logging.getLogger("mqttd.dispatch")

# After this many attempts of one batch that failed with a database error while the database
# itself answers `SELECT 1`, the error is the message's, not the database's: dead-letter it.
OUTAGE_ATTEMPTS_BEFORE_BLAME = 5


class Acker(Protocol):
    """Where committed messages are acknowledged: the MQTT session (or a test's stub).

    ``ack`` is called once per committed batch, with the batch's messages in arrival order; the
    acker sends the PUBACK (PUBREC for QoS 2) of each QoS 1/2 message on the connection that
    delivered it, in that order, and drops those of an earlier connection."""

    def ack(self, messages: list[Message]) -> None: ...

    def is_current(self, message: Message) -> bool:
        """Would an ack of ``message`` go out now (the connection that delivered it is up)?"""
        ...


class Dispatcher:
    def __init__(
        self,
        router: Router,
        intake: Intake,
        acker: Acker,
        deadletters: DeadLetterSink,
        stats: Stats,
        batch_size: int = 500,
        linger: float = 0.01,
        max_payload: int = 0,
        dedupe_property: str | None = None,
        use_dedupe_model: bool = True,
        poison: PoisonList | None = None,
        outage_backoff: tuple[float, float] = (0.2, 10.0),
    ) -> None:
        self.intake = intake
        self.acker = acker
        self.deadletters = deadletters
        self.stats = stats
        self.batch_size = batch_size
        self.linger = linger
        self.poison = poison
        self.outage_backoff = outage_backoff      # (first, most) seconds between outage retries
        self.runner = BatchRunner(router, deadletters, max_payload=max_payload,
                                  deduper=Deduper(use_dedupe_model, dedupe_property), poison=poison)
        self.in_hand = 0
        self.stop_event = threading.Event()
        self.committed_hooks: list[Callable[[list[Message]], None]] = []
        self.thread = threading.Thread(target=self.run, name="mqttd-dispatch", daemon=True)
        self.fatal: BaseException | None = None
        self.queries = QueryClock()               # the query the dispatcher waits in, for the watchdog

    @property
    def current(self) -> tuple[list[Message], Route, float] | None:
        """The handler call in flight: (messages, route, monotonic start). Read by the watchdog."""
        return self.runner.current

    # ---- the worker thread ------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float) -> None:
        """Finish (commit and ack) the batch in hand, take no more."""
        self.stop_event.set()
        self.intake.wake()
        self.thread.join(timeout)

    def run(self) -> None:
        try:
            self.queries.install()
            while not self.stop_event.is_set():
                batch = self.intake.take(self.batch_size, self.linger, self.stop_event)
                if batch:
                    self.in_hand = len(batch)
                    self.process(batch)
                    self.in_hand = 0
        except BaseException as exc:  # noqa: BLE001 - the watchdog reports it and exits non-zero
            self.fatal = exc
            log.critical("dispatcher died: %r", exc, exc_info=True)
        finally:
            from django.db import connections

            connections.close_all()

    def process(self, batch: list[Message]) -> bool:
        """Commit ``batch`` and ack it. Returns False if stopped before it could be acked."""
        result = self._commit(batch)
        if result is None or not self._store_in_file(batch, result):
            return False
        st, runner = self.stats, self.runner
        for hook in self.committed_hooks:
            try:
                hook(batch)
            except Exception:  # noqa: BLE001 - committed: nothing may stand between the commit and the ack
                log.exception("after-commit hook %r failed (the batch is acked all the same)", hook)
        self.acker.ack(batch)
        if self.poison:
            # Forget a hang only once its message is acked: one whose ack is dropped (its connection
            # is gone) comes back, and must still be set aside rather than hang the process again.
            try:
                self.poison.forget([m for m in batch if self.acker.is_current(m)])
            except OSError as exc:   # committed: the record ages out in a day
                log.warning("cannot update the poison list %s: %s", self.poison.path, exc)
            runner.suspects.clear()
        # Settled after the ack is handed over: until here the batch counts as in flight.
        last = result.last_user_msg.received_at if result.last_user_msg is not None else None
        st.settle(tally(batch, result, runner.deduper.verdicts), sum(1 for m in batch if m.qos), len(batch), last)
        return True

    def _commit(self, batch: list[Message]) -> BatchResult | None:
        """Run the batch until it commits, retrying through database outages; None if stopped."""
        from django.db import close_old_connections

        delay, attempts = self.outage_backoff[0], 0
        while True:
            attempts += 1
            try:
                close_old_connections()
                self.runner.deduper.reset()
                blame = attempts > OUTAGE_ATTEMPTS_BEFORE_BLAME and db_answers()
                result = self.runner.run(batch, blame)
                break
            except DatabaseUnavailable as exc:
                st = self.stats
                st.db_ok, st.db_error, st.db_retries = False, str(exc.__cause__ or exc)[:500], st.db_retries + 1
                if attempts == 1 or attempts % 10 == 0:
                    log.error("database unavailable, %d messages held un-acked, retrying in %.1fs: %s",
                              len(batch), delay, st.db_error)
                close_broken()
                if self.stop_event.wait(delay):
                    log.warning("stopping during a database outage: %d messages left un-acked "
                                "(the broker delivers them again)", len(batch))
                    return None
                delay = min(delay * 2, self.outage_backoff[1])
        st = self.stats
        if st.db_ok is False:
            log.info("database is back after %d attempts", attempts)
        st.db_ok, st.db_error, st.last_db_ok_at = True, None, time.time()
        return result

    def _store_in_file(self, batch: list[Message], result: BatchResult) -> bool:
        """Write the letters bound for deadletter.jsonl, retrying until it works: the batch is
        committed, but none of it is acked before its dead letters are stored (acks leave in
        arrival order, so the batch holds the stream, as an outage does). False if stopped."""
        delay = self.outage_backoff[0]
        while True:
            try:
                self.deadletters.to_file(result.to_file)
                if self.stats.deadletter_error is not None:
                    log.info("dead letters are written to %s again", self.deadletters.jsonl_path)
                self.stats.deadletter_error = None
                return True
            except OSError as exc:
                first = self.stats.deadletter_error is None
                self.stats.deadletter_error = f"cannot write {self.deadletters.jsonl_path}: {exc}"
                if first:
                    log.error("%s; holding %d committed messages un-acked until it can be written",
                              self.stats.deadletter_error, len(batch))
            if self.stop_event.wait(delay):
                log.warning("stopping with %d dead letters not written: %d committed messages left un-acked "
                            "(the broker delivers them again)", len(result.to_file), len(batch))
                return False
            delay = min(delay * 2, self.outage_backoff[1])
