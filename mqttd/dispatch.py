"""The dispatcher thread: batches from the intake -> the tenant's ORM -> acks after commit.

Per batch (SPEC §6):
1. ``close_old_connections()`` (nothing else in a daemon does it; a dead connection is never
   reopened by Django on its own).
2. ``BatchRunner.run``: every handler in one transaction, bad messages set aside as dead
   letters (``mqttd.batch``).
3. After the commit (and after dead-letter lines are fsynced, in file mode): ack every message of
   the batch on the connection that delivered it.
A database outage (OperationalError / InterfaceError) is never a dead letter: nothing is acked,
the batch is retried with backoff until the database is back, and the process stays up.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .batch import BatchRunner, DatabaseUnavailable
from .deadletters import DeadLetterSink
from .dedupe import Deduper
from .intake import Intake
from .message import Message
from .poison import PoisonList
from .router import Route, Router
from .stats import Stats

log = logging.getLogger("mqttd.dispatch")

# After this many attempts of one batch that failed with a database error while the database
# itself answers `SELECT 1`, the error is the message's, not the database's: dead-letter it.
OUTAGE_ATTEMPTS_BEFORE_BLAME = 5


class Dispatcher:
    def __init__(
        self,
        router: Router,
        intake: Intake,
        ack: Callable[[list[tuple[int, int]], float], None],
        deadletters: DeadLetterSink,
        stats: Stats,
        batch_size: int = 500,
        linger: float = 0.01,
        max_payload: int = 0,
        dedupe_property: str | None = None,
        use_dedupe_model: bool = True,
        poison: PoisonList | None = None,
    ) -> None:
        self.intake = intake
        self._ack = ack
        self.deadletters = deadletters
        self.stats = stats
        self.batch_size = batch_size
        self.linger = linger
        self.poison = poison
        self.runner = BatchRunner(router, deadletters, stats, max_payload=max_payload,
                                  deduper=Deduper(use_dedupe_model, dedupe_property), poison=poison)
        self.in_hand = 0
        self.stop_event = threading.Event()
        self.committed_hooks: list[Callable[[list[Message]], None]] = []
        self.thread = threading.Thread(target=self.run, name="mqttd-dispatch", daemon=True)
        self.fatal: BaseException | None = None

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
        self.thread.join(timeout)

    def run(self) -> None:
        try:
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
        """Commit ``batch`` and ack it. Returns False if stopped during a database outage."""
        from django.db import close_old_connections

        delay, attempts = 0.2, 0
        while True:
            attempts += 1
            try:
                close_old_connections()
                blame = attempts > OUTAGE_ATTEMPTS_BEFORE_BLAME and self._db_answers()
                letters = self.runner.run(batch, blame)
                break
            except DatabaseUnavailable as exc:
                st = self.stats
                st.db_ok, st.db_error, st.db_retries = False, str(exc.__cause__ or exc)[:500], st.db_retries + 1
                if attempts == 1 or attempts % 10 == 0:
                    log.error("database unavailable, %d messages held un-acked, retrying in %.1fs: %s",
                              len(batch), delay, st.db_error)
                self._close_broken()
                if self.stop_event.wait(delay):
                    log.warning("stopping during a database outage: %d messages left un-acked "
                                "(the broker delivers them again)", len(batch))
                    return False
                delay = min(delay * 2, 10.0)
        st = self.stats
        if st.db_ok is False:
            log.info("database is back after %d attempts", attempts)
        st.db_ok, st.db_error, st.last_db_ok_at = True, None, time.time()
        try:
            self.deadletters.after_commit(letters)
        except OSError as exc:
            # The handler rows are committed; the failed messages are not acked so the broker
            # keeps them (they return on the next connection) rather than losing them.
            log.error("cannot write dead letters to %s: %s; leaving %d messages un-acked",
                      self.deadletters.jsonl_path, exc, len(letters))
            failed = {id(lt.msg) for lt in letters}
            batch = [m for m in batch if id(m) not in failed]
        runner = self.runner
        if self.poison:
            self.poison.forget(batch)
            runner.suspects.clear()
        for hook in self.committed_hooks:
            hook(batch)
        self._ack([(m.generation, m.mid) for m in batch if m.qos], batch[0].received_at if batch else 0.0)
        st.handled += len(batch) - runner.builtin
        st.acked += sum(1 for m in batch if m.qos)
        st.dead_letters += len(letters)
        st.duplicates_skipped += runner.dups
        st.batches += 1
        st.last_batch_size = len(batch)
        if runner.last_user_msg is not None:
            st.last_message_at = runner.last_user_msg.received_at
        return True

    # ---- outage detection ---------------------------------------------------------------------------
    @staticmethod
    def _db_answers() -> bool:
        from django.db import close_old_connections, connection

        try:
            close_old_connections()
            with connection.cursor() as cur:
                cur.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001
            return False

    @staticmethod
    def _close_broken() -> None:
        from django.db import connections

        for conn in connections.all(initialized_only=True):
            try:
                if conn.in_atomic_block:
                    continue
                conn.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
