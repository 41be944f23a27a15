"""One batch in one transaction: every handler of every message, then one commit.

1. Optimistic pass: all handlers in ONE ``transaction.atomic()``; dedupe keys are checked and
   recorded in the same transaction. One commit for the whole batch, no savepoints.
2. Only if a handler failed: the careful pass, again one transaction, in which the messages run
   in spans of one savepoint each; the one that fails is rolled back with its span, its
   predecessors run again, and it becomes a dead letter. A bad message never rolls back its
   neighbours, and a batch with a few failures costs a few savepoints, not one per message.

A handler *fails* when it raises, and also when it breaks the handler contract without raising
(``TxGuard``: it swallowed a database error, closed the connection, ended the transaction).
One that destroyed the transaction itself (closed the connection, committed or rolled back,
raising afterwards or not) is set aside and the careful pass starts again without it: nothing of
the lost transaction is trusted. Before any commit the transaction is checked once more: a batch
is never reported committed (and so never acked) when Django would roll it back silently.
3. Last resort: when the careful pass cannot commit and the database answers (a deferred
   foreign key checked only at COMMIT), every (message, route) runs in a transaction of its own.

A database outage (OperationalError / InterfaceError) is never a dead letter: ``run`` raises
``DatabaseUnavailable`` and the dispatcher retries the whole batch.

This module runs the optimistic pass and chooses the next; the careful pass, the last resort and
the handler-call plumbing they share are in ``mqttd.ingest.recovery``.
"""
from __future__ import annotations

import logging

from mqttd.django.db import TxGuard, is_outage
from mqttd.ingest.deadletters import DeadLetterSink, Letter
from mqttd.ingest.dedupe import Deduper
from mqttd.ingest.gaps import GapRecorder
from mqttd.ingest.plan import BatchResult, Unit, plan
from mqttd.ingest.poison import PoisonList

# DatabaseUnavailable is re-exported: the dispatcher, mqttd.testing and docs/handlers.md name it
# mqttd.ingest.batch.DatabaseUnavailable, the module a tenant reads about.
from mqttd.ingest.recovery import (
    DatabaseUnavailable,
    RecoveryPasses,
    _CommitFailed,
    _TransactionLost,
)
from mqttd.message import Message
from mqttd.router import Route, Router

log = logging.getLogger("mqttd.dispatch")


class _HandlerFailed(Exception):
    pass


class BatchRunner(RecoveryPasses):
    """Runs batches for one dispatcher. ``current`` is the handler call in flight (messages,
    route, monotonic start), read by the watchdog."""

    def __init__(self, router: Router, deadletters: DeadLetterSink, *, max_payload: int = 0,
                 deduper: Deduper, poison: PoisonList | None = None) -> None:
        self.router = router
        self.deadletters = deadletters
        self.max_payload = max_payload
        self.deduper = deduper
        self.poison = poison
        self.guard = TxGuard()
        self.current: tuple[list[Message], Route, float] | None = None
        # Messages that hung inside a batch=True call before (poison list): run them alone.
        self.suspects: set[int] = set()
        self._dups = 0
        # Gap detection (mqttd.ingest.gaps, set by the daemon when it is on): records the batch's
        # stamps inside every transaction that commits the batch (``_in_commit``).
        self.gaps: GapRecorder | None = None
        self._batch: list[Message] = []

    # ---- planning (mqttd.ingest.plan) --------------------------------------------------------------------
    def _plan(self, batch: list[Message], result: BatchResult) -> tuple[list[Unit], list[Letter]]:
        return plan(batch, self.router, self._set_aside, result)

    def _set_aside(self, msg: Message) -> str | None:
        """Why ``msg`` must not run at all, or None."""
        rec = self.poison.lookup(msg) if self.poison else None
        if rec is not None and rec.alone:
            return (f"HandlerTimeout: {rec.route} did not finish within dispatch.handler_timeout "
                    f"({rec.timeout:g}s) on this message; the process was restarted and no handler is run on it again")
        if rec is not None:
            self.suspects.add(id(msg))     # hung as part of a batch=True call: run it alone
        if self.max_payload and len(msg.payload) > self.max_payload:
            return f"PayloadTooLarge: payload of {len(msg.payload)} bytes exceeds dispatch.max_payload ({self.max_payload})"
        return None

    # ---- the batch ------------------------------------------------------------------------------------
    def run(self, batch: list[Message], blame: bool) -> BatchResult:
        """Run every handler of ``batch`` in one transaction and commit.

        Raises DatabaseUnavailable for an outage (nothing committed). ``blame``: the database
        answers, so a database error is the message's own and becomes a dead letter."""
        from django.db import transaction

        result = BatchResult()
        units, letters = self._plan(batch, result)
        self._dups = 0
        self._batch = batch
        if not units and not letters and not (self.gaps and self.gaps.any_stamped(batch)):
            return result
        set_aside: dict[tuple[int, Route], Letter] = {}
        split: set[Route] = set()          # batch=True routes whose one call lost the transaction
        try:
            with transaction.atomic():
                self.guard.begin()
                try:
                    todo, keys = self._dedupe(units)
                    self._run_optimistic(todo)
                    self._record(keys)
                except Exception as exc:      # a handler, a key function, or the dedupe table
                    raise _HandlerFailed() from exc
                result.to_file = self._in_commit(letters)
                self.guard.before_commit()
            result.letters, result.duplicates = letters, self._dups
            return result
        except _HandlerFailed as failed:
            cause = failed.__cause__
            if is_outage(cause) and not blame:
                raise DatabaseUnavailable(str(cause)) from cause
            if isinstance(cause, _TransactionLost):
                self._lost(cause, set_aside, split)
        except Exception as exc:
            # The commit failed, or the dedupe / dead-letter tables did. Not an outage (a deferred
            # constraint checked at COMMIT, a transaction Django would roll back): the careful pass.
            if is_outage(exc):
                raise DatabaseUnavailable(str(exc)) from exc
        while True:
            self._dups = 0
            try:
                result.letters, result.to_file = self._run_careful(units, letters, set_aside, split, blame)
            except _TransactionLost as lost:
                self._lost(lost, set_aside, split)
                continue
            except _CommitFailed as failed:
                log.warning("the careful pass of a batch of %d could not commit (%s: %s): running its messages "
                            "in a transaction each", len(batch), type(failed.cause).__name__, failed.cause)
                result.letters, result.to_file = self._run_isolated(units, letters, set_aside, blame)
            result.duplicates = self._dups
            return result


    def _lost(self, lost: _TransactionLost, set_aside: dict[tuple[int, Route], Letter], split: set[Route]) -> None:
        """A handler call destroyed the transaction: set its message aside (a dead letter), or run
        the messages of a batch=True call one by one to find the one that does it."""
        if len(lost.units) > 1:
            split.add(lost.units[0][1])
        else:
            msg, route, _ = lost.units[0]
            set_aside[(id(msg), route)] = self._letter(msg, route, lost.error)

    def _run_optimistic(self, units: list[Unit]) -> None:
        groups: dict[Route, list[Unit]] = {}
        suspects = self.suspects
        for unit in units:
            msg, route, _ = unit
            if route.batch and not (suspects and id(msg) in suspects):
                groups.setdefault(route, []).append(unit)
            else:
                self._run_unit_call(route, [unit])
        for route, group in groups.items():
            self._run_unit_call(route, group)
