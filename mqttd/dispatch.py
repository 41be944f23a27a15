"""Messages -> the tenant's Django ORM in batched transactions; acks only after commit.

Per batch (SPEC §6):
1. ``close_old_connections()`` (nothing else in a daemon does it; a dead connection is never
   reopened by Django on its own).
2. Optimistic pass: every handler of every message in ONE ``transaction.atomic()``; dedupe keys
   are checked and recorded in the same transaction. One commit for the whole batch.
3. Only if a handler raised: careful pass, again one transaction but with a savepoint per
   (message, route), so a bad message becomes a dead letter and never rolls back its neighbours.
4. After the commit (and after dead-letter lines are fsynced, in file mode): ack every message of
   the batch on the connection that delivered it.
A database outage (OperationalError / InterfaceError) is never a dead letter: nothing is acked,
the batch is retried with backoff until the database is back, and the process stays up.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable

from .deadletters import DeadLetterSink, Letter
from .dedupe import Deduper
from .message import Message
from .poison import PoisonList
from .router import Route, Router
from .stats import Stats

log = logging.getLogger("mqttd.dispatch")

# After this many attempts of one batch that failed with a database error while the database
# itself answers `SELECT 1`, the error is the message's, not the database's: dead-letter it.
OUTAGE_ATTEMPTS_BEFORE_BLAME = 5


class Intake:
    """Network thread -> dispatcher hand-off. ``put`` never blocks and never drops: the network
    thread stops reading the socket instead when ``len()`` passes the high-water mark."""

    def __init__(self) -> None:
        self._q: deque[Message] = deque()
        self._ready = threading.Event()

    def put(self, msg: Message) -> None:
        self._q.append(msg)
        if not self._ready.is_set():
            self._ready.set()

    def __len__(self) -> int:
        return len(self._q)

    def take(self, size: int, linger: float, stop: threading.Event) -> list[Message]:
        """Up to ``size`` messages: waits for the first, then at most ``linger`` s to fill."""
        q, ready = self._q, self._ready
        while not q:
            ready.clear()
            if q:
                break
            if stop.is_set():
                return []
            ready.wait(0.1)
        batch: list[Message] = []
        deadline = time.monotonic() + linger
        while True:
            while q and len(batch) < size:
                batch.append(q.popleft())
            if len(batch) >= size:
                return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.is_set():
                return batch
            ready.clear()
            if not q:
                ready.wait(remaining)


class DatabaseUnavailable(Exception):
    pass


class _HandlerFailed(Exception):
    pass


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
        self.router = router
        self.intake = intake
        self._ack = ack
        self.deadletters = deadletters
        self.stats = stats
        self.batch_size = batch_size
        self.linger = linger
        self.max_payload = max_payload
        self.deduper = Deduper(use_dedupe_model, dedupe_property)
        self.poison = poison
        # The handler call in flight: (messages, route, monotonic start). Read by the watchdog.
        self.current: tuple[list[Message], Route, float] | None = None
        self._suspects: set[int] = set()
        self.in_hand = 0
        self.stop_event = threading.Event()
        self.committed_hooks: list[Callable[[list[Message]], None]] = []
        self.thread = threading.Thread(target=self.run, name="mqttd-dispatch", daemon=True)
        self.fatal: BaseException | None = None
        self._dups = 0
        self._builtin = 0
        self._last_user_msg: Message | None = None

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
                letters = self._commit(batch, blame)
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
        if self.poison:
            self.poison.forget(batch)
            self._suspects.clear()
        for hook in self.committed_hooks:
            hook(batch)
        self._ack([(m.generation, m.mid) for m in batch if m.qos], batch[0].received_at if batch else 0.0)
        st.handled += len(batch) - self._builtin
        st.acked += sum(1 for m in batch if m.qos)
        st.dead_letters += len(letters)
        st.duplicates_skipped += self._dups
        st.batches += 1
        st.last_batch_size = len(batch)
        if self._last_user_msg is not None:
            st.last_message_at = self._last_user_msg.received_at
        return True

    # ---- one batch ---------------------------------------------------------------------------------
    def _plan(self, batch: list[Message]) -> tuple[list[tuple[Message, Route, dict]], list[Letter]]:
        units: list[tuple[Message, Route, dict]] = []
        letters: list[Letter] = []
        unrouted = 0
        self._builtin = 0
        self._last_user_msg = None
        for msg in batch:
            matches = self.router.match(msg.topic)
            if not matches:
                unrouted += 1
                continue
            if matches[0][0].builtin and len(matches) == 1:
                self._builtin += 1          # the canary: not tenant traffic, not in handled/rates
            else:
                self._last_user_msg = msg
            if self.poison:
                rec = self.poison.lookup(msg)
                if rec is not None and rec.alone:
                    letters.append(Letter(msg, rec.route, f"HandlerTimeout: {rec.route} did not finish within "
                                          f"dispatch.handler_timeout ({rec.timeout:g}s) on this message; the "
                                          "process was restarted and the handler is not run on it again"))
                    continue
                if rec is not None:
                    self._suspects.add(id(msg))     # hung as part of a batch=True call: run it alone
            if self.max_payload and len(msg.payload) > self.max_payload:
                letters.append(Letter(msg, matches[0][0].name, f"payload of {len(msg.payload)} bytes exceeds "
                                      f"dispatch.max_payload ({self.max_payload})"))
                continue
            if len(matches) == 1:
                msg.params = matches[0][1]
            for route, params in matches:
                units.append((msg, route, params))
        self.stats.unrouted += unrouted
        return units, letters

    def _commit(self, batch: list[Message], blame: bool) -> list[Letter]:
        from django.db import transaction

        units, letters = self._plan(batch)
        self._dups = 0
        if not units and not letters:
            return []
        try:
            with transaction.atomic():
                try:
                    todo = self._dedupe(units)
                except Exception as exc:      # a key function, or the dedupe table
                    raise _HandlerFailed() from exc
                self._run_optimistic(todo)
                self.deadletters.in_transaction(letters)
            return letters
        except _HandlerFailed as failed:
            cause = failed.__cause__
            if self._is_outage(cause) and not blame:
                raise DatabaseUnavailable(str(cause)) from cause
        except Exception as exc:  # the commit failed, or the dedupe / dead-letter tables did
            raise DatabaseUnavailable(str(exc)) from exc
        self._dups = 0
        return self._run_careful(units, letters, blame)

    def _run_optimistic(self, units: list[tuple[Message, Route, dict]]) -> None:
        groups: dict[Route, list[Message]] = {}
        suspects = self._suspects
        clock = time.monotonic
        try:
            for msg, route, params in units:
                if route.batch:
                    m = msg if msg.params is params else msg.with_params(params)
                    if suspects and id(msg) in suspects:
                        self.current = ([m], route, clock())
                        route.handler([m])
                    else:
                        groups.setdefault(route, []).append(m)
                else:
                    self.current = ([msg], route, clock())
                    route.handler(msg, **params)
            for route, msgs in groups.items():
                self.current = (msgs, route, clock())
                route.handler(msgs)
        except Exception as exc:
            raise _HandlerFailed() from exc
        finally:
            self.current = None

    def _run_careful(self, units: list[tuple[Message, Route, dict]], letters: list[Letter], blame: bool) -> list[Letter]:
        from django.db import IntegrityError, transaction

        letters = list(letters)
        groups: dict[Route, list[tuple[Message, dict]]] = {}
        try:
            with transaction.atomic():
                for msg, route, params in units:
                    if route.batch and id(msg) not in self._suspects:
                        groups.setdefault(route, []).append((msg, params))
                        continue
                    if route.batch:       # a suspect of an earlier hang runs alone
                        m = msg if msg.params is params else msg.with_params(params)
                        self._one(m, route, lambda m=m, route=route: route.handler([m]), letters, blame)
                        continue
                    self._one(msg, route, lambda: route.handler(msg, **params), letters, blame)
                for route, items in groups.items():
                    msgs = [m if m.params is p else m.with_params(p) for m, p in items]
                    try:
                        with transaction.atomic():
                            todo = [m for m, _, _ in self._dedupe([(m, route, {}) for m in msgs])]
                            self.current = (todo, route, time.monotonic())
                            route.handler(todo)
                        continue
                    except IntegrityError:
                        pass
                    except Exception as exc:  # noqa: BLE001
                        if self._is_outage(exc) and not blame:
                            raise DatabaseUnavailable(str(exc)) from exc
                    for m in msgs:
                        self._one(m, route, lambda m=m: route.handler([m]), letters, blame)
                self.current = None
                self.deadletters.in_transaction(letters)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            raise DatabaseUnavailable(str(exc)) from exc
        return letters

    def _one(self, msg: Message, route: Route, call: Callable[[], object], letters: list[Letter], blame: bool) -> None:
        """Run one (message, route) in a savepoint; a failure becomes a dead letter."""
        from django.db import transaction

        try:
            with transaction.atomic():
                if self._dedupe([(msg, route, {})]):
                    self.current = ([msg], route, time.monotonic())
                    call()
        except Exception as exc:  # noqa: BLE001 - every handler error becomes a dead letter
            if isinstance(exc, _HandlerFailed) and exc.__cause__ is not None:
                exc = exc.__cause__
            if self._is_outage(exc) and not blame:
                raise DatabaseUnavailable(str(exc)) from exc
            log.warning("handler %s failed on %s: %s: %s", route.name, msg.topic, type(exc).__name__, exc)
            tb = "".join(traceback.format_exception(exc))
            letters.append(Letter(msg, route.name, f"{type(exc).__name__}: {exc}", tb))

    def _dedupe(self, units: list[tuple[Message, Route, dict]]) -> list[tuple[Message, Route, dict]]:
        keep, dup = self.deduper.filter(units)
        self._dups += dup
        return keep

    # ---- outage detection ---------------------------------------------------------------------------
    @staticmethod
    def _is_outage(exc: BaseException | None) -> bool:
        from django.db import InterfaceError, OperationalError

        return isinstance(exc, (OperationalError, InterfaceError))

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
