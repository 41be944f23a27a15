"""One batch in one transaction: every handler of every message, then one commit.

1. Optimistic pass: all handlers in ONE ``transaction.atomic()``; dedupe keys are checked and
   recorded in the same transaction. One commit for the whole batch, no savepoints.
2. Only if a handler raised: the careful pass, again one transaction, in which the messages run
   in spans of one savepoint each; the one that raises is rolled back with its span, its
   predecessors run again, and it becomes a dead letter. A bad message never rolls back its
   neighbours, and a batch with a few failures costs a few savepoints, not one per message.
A database outage (OperationalError / InterfaceError) is never a dead letter: ``run`` raises
``DatabaseUnavailable`` and the dispatcher retries the whole batch.
"""
from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable

from .deadletters import DeadLetterSink, Letter
from .dedupe import Deduper
from .message import Message
from .poison import PoisonList
from .router import Route, Router
from .stats import Stats

log = logging.getLogger("mqttd.dispatch")

Unit = tuple[Message, Route, dict]
SPAN = 32               # units per savepoint in the careful pass (see BatchRunner._run_spans)
# A per-message unit of the careful pass: the message, its route, and the call that runs it.
_Single = tuple[Message, Route, Callable[[], object]]


class DatabaseUnavailable(Exception):
    pass


class _HandlerFailed(Exception):
    pass


class _UnitFailed(Exception):
    """Unit ``index`` of a span raised (the cause)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def is_outage(exc: BaseException | None) -> bool:
    """Is this the database being unavailable (rather than a handler's error)?"""
    from django.db import InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError))


class BatchRunner:
    """Runs batches for one dispatcher. ``current`` is the handler call in flight, read by the
    watchdog; ``dups``, ``builtin`` and ``last_user_msg`` describe the last batch run."""

    def __init__(self, router: Router, deadletters: DeadLetterSink, stats: Stats, *, max_payload: int = 0,
                 deduper: Deduper, poison: PoisonList | None = None) -> None:
        self.router = router
        self.deadletters = deadletters
        self.stats = stats
        self.max_payload = max_payload
        self.deduper = deduper
        self.poison = poison
        # The handler call in flight: (messages, route, monotonic start).
        self.current: tuple[list[Message], Route, float] | None = None
        # Messages that hung inside a batch=True call before (poison list): run them alone.
        self.suspects: set[int] = set()
        self.dups = 0
        self.builtin = 0
        self.last_user_msg: Message | None = None

    def _plan(self, batch: list[Message]) -> tuple[list[Unit], list[Letter]]:
        """Route every message. Those that must not run (known poison, oversize payload) become
        dead letters here; a message matching several routes is one unit per route."""
        units: list[Unit] = []
        letters: list[Letter] = []
        unrouted = 0
        self.builtin = 0
        self.last_user_msg = None
        for msg in batch:
            matches = self.router.match(msg.topic)
            if not matches:
                unrouted += 1
                continue
            if matches[0][0].builtin and len(matches) == 1:
                self.builtin += 1          # the canary: not tenant traffic, not in handled/rates
            else:
                self.last_user_msg = msg
            if self.poison:
                rec = self.poison.lookup(msg)
                if rec is not None and rec.alone:
                    letters.append(Letter(msg, rec.route, f"HandlerTimeout: {rec.route} did not finish within "
                                          f"dispatch.handler_timeout ({rec.timeout:g}s) on this message; the "
                                          "process was restarted and the handler is not run on it again"))
                    continue
                if rec is not None:
                    self.suspects.add(id(msg))     # hung as part of a batch=True call: run it alone
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

    def run(self, batch: list[Message], blame: bool) -> list[Letter]:
        """Run every handler of ``batch`` in one transaction and commit; the dead letters it made.

        Raises DatabaseUnavailable for an outage (nothing committed). ``blame``: the database
        answers, so a database error is the message's own and becomes a dead letter."""
        from django.db import transaction

        units, letters = self._plan(batch)
        self.dups = 0
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
            if is_outage(cause) and not blame:
                raise DatabaseUnavailable(str(cause)) from cause
        except Exception as exc:  # the commit failed, or the dedupe / dead-letter tables did
            raise DatabaseUnavailable(str(exc)) from exc
        self.dups = 0
        return self._run_careful(units, letters, blame)

    def _run_optimistic(self, units: list[Unit]) -> None:
        groups: dict[Route, list[Message]] = {}
        suspects = self.suspects
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

    def _run_careful(self, units: list[Unit], letters: list[Letter], blame: bool) -> list[Letter]:
        """The batch again after a handler raised: one transaction still, the failures set aside.

        Per-message units run in spans (``_run_spans``); a ``batch=True`` route's messages run as
        one call in a savepoint, and one by one (in spans) only if that call fails."""
        from django.db import IntegrityError, transaction

        letters = list(letters)
        singles: list[_Single] = []
        groups: dict[Route, list[tuple[Message, dict]]] = {}
        for msg, route, params in units:
            if route.batch and id(msg) not in self.suspects:
                groups.setdefault(route, []).append((msg, params))
            elif route.batch:         # a suspect of an earlier hang runs alone
                m = msg if msg.params is params else msg.with_params(params)
                singles.append((m, route, lambda m=m, route=route: route.handler([m])))
            else:
                singles.append((msg, route, lambda msg=msg, route=route, params=params: route.handler(msg, **params)))
        try:
            with transaction.atomic():
                self._run_spans(singles, letters, blame)
                for route, items in groups.items():
                    msgs = [m if m.params is p else m.with_params(p) for m, p in items]
                    dups_before = self.dups
                    try:
                        with transaction.atomic():
                            todo = [m for m, _, _ in self._dedupe([(m, route, {}) for m in msgs])]
                            self.current = (todo, route, time.monotonic())
                            route.handler(todo)
                        continue
                    except IntegrityError:
                        pass
                    except Exception as exc:  # noqa: BLE001
                        if is_outage(exc) and not blame:
                            raise DatabaseUnavailable(str(exc)) from exc
                    self.dups = dups_before          # the spans count them again
                    self._run_spans([(m, route, lambda m=m, route=route: route.handler([m])) for m in msgs],
                                    letters, blame)
                self.current = None
                self.deadletters.in_transaction(letters)
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            raise DatabaseUnavailable(str(exc)) from exc
        return letters

    def _run_spans(self, singles: list[_Single], letters: list[Letter], blame: bool) -> None:
        """Per-message units with a savepoint per *span* of up to SPAN units, not per message.

        When unit k raises, its span is rolled back, the units before k (which had just
        succeeded) run again in a span of their own, and the next span starts with k: raising
        again as the first unit of a span, it becomes a dead letter. A batch of N with F failures
        costs about N / SPAN + F savepoints and F * SPAN / 2 re-runs, instead of a savepoint round
        trip for every message (SPAN = 32 is about the optimum for N = 500 and a few failures).
        A failure that no unit raised (the dedupe table, a savepoint that cannot be released)
        falls back to a savepoint per message for that span."""
        i, n = 0, len(singles)
        while i < n:
            end = min(n, i + SPAN)
            while True:
                failed, exc = self._span(singles, i, end)
                if exc is None:
                    i = end
                    break
                if is_outage(exc) and not blame:
                    raise DatabaseUnavailable(str(exc)) from exc
                if failed is None:
                    for msg, route, call in singles[i:end]:
                        self._one(msg, route, call, letters, blame)
                    i = end
                    break
                if failed == i:
                    self._letter(msg=singles[i][0], route=singles[i][1], exc=exc, letters=letters)
                    i += 1
                    break
                end = failed

    def _span(self, singles: list[_Single], start: int, end: int) -> tuple[int | None, BaseException | None]:
        """Run ``singles[start:end]`` in one savepoint: (None, None) when it was released,
        (k, exc) when unit k raised, (None, exc) when the span failed outside any unit."""
        from django.db import transaction

        k = start
        dups_before = self.dups
        try:
            with transaction.atomic():
                span = singles[start:end]
                # Per (message, route): a message may be a duplicate for one route's key only.
                kept = {(id(m), r) for m, r, _ in self._dedupe([(m, route, {}) for m, route, _ in span])}
                for k in range(start, end):
                    msg, route, call = singles[k]
                    if (id(msg), route) not in kept:
                        continue
                    self.current = ([msg], route, time.monotonic())
                    try:
                        call()
                    except Exception as exc:
                        raise _UnitFailed(k) from exc
        except _UnitFailed as failed:
            self.dups = dups_before            # counted again when the span runs again
            return failed.index, failed.__cause__
        except Exception as exc:  # noqa: BLE001 - the dedupe table, or the savepoint itself
            self.dups = dups_before
            return None, exc
        finally:
            self.current = None
        return None, None

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
            if is_outage(exc) and not blame:
                raise DatabaseUnavailable(str(exc)) from exc
            self._letter(msg, route, exc, letters)

    @staticmethod
    def _letter(msg: Message, route: Route, exc: BaseException, letters: list[Letter]) -> None:
        log.warning("handler %s failed on %s: %s: %s", route.name, msg.topic, type(exc).__name__, exc)
        tb = "".join(traceback.format_exception(exc))
        letters.append(Letter(msg, route.name, f"{type(exc).__name__}: {exc}", tb))

    def _dedupe(self, units: list[Unit]) -> list[Unit]:
        keep, dup = self.deduper.filter(units)
        self.dups += dup
        return keep
