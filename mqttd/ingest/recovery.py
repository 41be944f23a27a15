"""The recovery passes of a batch (``mqttd.ingest.batch`` runs the optimistic pass and decides).

- The careful pass: the batch again in one transaction, per-message units in spans of one
  savepoint each (``_run_spans``), a ``batch=True`` route's messages as one call in a savepoint
  (``_group``); a failing unit is rolled back with its span and becomes a dead letter.
- The last resort (``_run_isolated``): every (message, route) in a transaction of its own, when
  the careful pass cannot commit and the database answers.
- The plumbing every pass shares: the guarded handler call, dedupe, and the last work inside a
  committing transaction (gap record, dead letters).

``BatchRunner`` inherits these as ``RecoveryPasses``: the state (guard, dedupe counter, batch in
flight) lives on the one runner, so a mixin keeps the passes' code apart without threading that
state through every call. Nothing here imports ``mqttd.ingest.batch``: it depends on this module,
not the other way round.
"""
from __future__ import annotations

import time

from mqttd.django.db import TxGuard, is_outage
from mqttd.errors import HandlerContractError
from mqttd.ingest.deadletters import DeadLetterSink, Letter
from mqttd.ingest.dedupe import Deduper
from mqttd.ingest.gaps import GapRecorder
from mqttd.ingest.plan import Unit, letter_for
from mqttd.message import Message
from mqttd.router import Route

SPAN = 32               # units per savepoint in the careful pass (see RecoveryPasses._run_spans)


class DatabaseUnavailable(Exception):
    pass


class _UnitFailed(Exception):
    """Unit ``index`` of a span failed (the cause)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class _CommitFailed(Exception):
    """The careful pass's transaction could not commit, and the database answers."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _TransactionLost(Exception):
    """A handler call destroyed the batch transaction (``HandlerContractError.lost``)."""

    def __init__(self, units: list[Unit], error: HandlerContractError) -> None:
        super().__init__(str(error))
        self.units, self.error = units, error


class RecoveryPasses:
    """The careful pass, the last resort and the handler-call plumbing of ``BatchRunner``.

    The attributes are set by ``BatchRunner.__init__``; declared here for the type checker."""

    deadletters: DeadLetterSink
    deduper: Deduper
    guard: TxGuard
    current: tuple[list[Message], Route, float] | None
    suspects: set[int]
    gaps: GapRecorder | None
    _dups: int
    _batch: list[Message]


    # ---- one handler call ---------------------------------------------------------------------------
    def _call(self, route: Route, msgs: list[Message]) -> None:
        """Run the handler on ``msgs`` (one message unless ``route.batch``) and check that it left
        the transaction usable, also when it raised (it may have closed the connection first).
        The in-flight record is cleared whatever happens."""
        self.current = (msgs, route, time.monotonic())
        try:
            self.guard.call(route, msgs)
        finally:
            self.current = None

    def _dedupe(self, units: list[Unit]) -> tuple[list[Unit], list[tuple[str, str]]]:
        """The units to run and the dedupe keys to ``_record`` once they succeeded."""
        keep, dup, keys = self.deduper.filter(units)
        self._dups += dup
        return keep, keys

    def _record(self, keys: list[tuple[str, str]]) -> None:
        self.deduper.record(keys)


    def _in_commit(self, letters: list[Letter]) -> list[Letter]:
        """The last work inside a transaction that commits the batch: the gap record, then the
        dead letters (what ``DeadLetterSink.in_transaction`` returns: the letters for the file)."""
        if self.gaps is not None:
            self.gaps.record(self._batch)
        return self.deadletters.in_transaction(letters)

    def _run_careful(self, units: list[Unit], letters: list[Letter], set_aside: dict[tuple[int, Route], Letter],
                     split: set[Route], blame: bool) -> tuple[list[Letter], list[Letter]]:
        """The batch again after a handler failed: one transaction still, the failures set aside.

        Per-message units run in spans (``_run_spans``); a ``batch=True`` route's messages run as
        one call in a savepoint, and one by one (in spans) only if that call fails."""
        from django.db import transaction

        letters = list(letters) + list(set_aside.values())
        singles: list[Unit] = []
        groups: dict[Route, list[Unit]] = {}
        for unit in units:
            msg, route, _ = unit
            if (id(msg), route) in set_aside:
                continue
            if route.batch and route not in split and id(msg) not in self.suspects:
                groups.setdefault(route, []).append(unit)
            else:
                singles.append(unit)
        try:
            with transaction.atomic():
                self.guard.begin()
                self._run_spans(singles, letters, blame)
                for route, items in groups.items():
                    if not self._group(route, items, blame):
                        self._run_spans(items, letters, blame)
                to_file = self._in_commit(letters)
                self.guard.before_commit()
        except (DatabaseUnavailable, _TransactionLost):
            raise
        except Exception as exc:
            # Not an outage (that shows again in the isolated run, which then raises it).
            if is_outage(exc):
                raise DatabaseUnavailable(str(exc)) from exc
            raise _CommitFailed(exc) from exc
        return letters, to_file

    def _run_isolated(self, units: list[Unit], letters: list[Letter], set_aside: dict[tuple[int, Route], Letter],
                      blame: bool) -> tuple[list[Letter], list[Letter]]:
        """The last resort, when even the careful pass cannot commit for a reason that is not an
        outage (a deferred constraint checked only at COMMIT): every (message, route) in a
        transaction of its own, so the one whose commit fails is the dead letter. An outage half
        way raises DatabaseUnavailable and the batch runs again (at least once: the units already
        committed run again, or are skipped by their dedupe key)."""
        from django.db import transaction

        letters = list(letters) + list(set_aside.values())
        for unit in units:
            msg, route, _ = unit
            if (id(msg), route) in set_aside:
                continue
            try:
                with transaction.atomic():
                    self.guard.begin()
                    todo, keys = self._dedupe([unit])
                    if todo:
                        self._run_unit_call(route, todo)
                        self._record(keys)
                    self.guard.before_commit()
            except _TransactionLost as lost:
                letters.append(self._letter(msg, route, lost.error))
            except Exception as exc:  # noqa: BLE001 - the unit's own failure, at COMMIT or before
                if is_outage(exc) and not blame:
                    raise DatabaseUnavailable(str(exc)) from exc
                letters.append(self._letter(msg, route, exc))
        try:
            with transaction.atomic():
                to_file = self._in_commit(letters)
                self.guard.before_commit()
        except Exception as exc:
            raise DatabaseUnavailable(str(exc)) from exc
        return letters, to_file

    def _group(self, route: Route, items: list[Unit], blame: bool) -> bool:
        """A ``batch=True`` route's messages as one call in a savepoint. False if it failed (rolled
        back; the caller runs them one by one)."""
        from django.db import transaction

        dups_before = self._dups
        try:
            with transaction.atomic():
                todo, keys = self._dedupe(items)
                if todo:
                    self._run_unit_call(route, todo)
                    self._record(keys)
            return True
        except _TransactionLost:
            raise
        except Exception as exc:  # noqa: BLE001
            if is_outage(exc) and not blame:
                raise DatabaseUnavailable(str(exc)) from exc
        self._dups = dups_before          # the spans count them again
        return False

    def _run_unit_call(self, route: Route, units: list[Unit]) -> None:
        """``_call`` for units, turning a lost transaction into ``_TransactionLost``."""
        try:
            self._call(route, [m for _, _, m in units])
        except HandlerContractError as err:
            if err.lost:
                raise _TransactionLost(units, err) from err
            raise

    def _run_spans(self, singles: list[Unit], letters: list[Letter], blame: bool) -> None:
        """Per-message units with a savepoint per *span* of up to SPAN units, not per message.

        When unit k fails, its span is rolled back, the units before k (which had just succeeded)
        run again in a span of their own, and the next span starts with k: failing again as the
        first unit of a span, it becomes a dead letter. A batch of N with F failures costs about
        N / SPAN + F savepoints and F * SPAN / 2 re-runs, instead of a savepoint round trip for
        every message (SPAN = 32 is about the optimum for N = 500 and a few failures). A failure
        that no unit raised (the dedupe table, a savepoint that cannot be released) falls back to
        a savepoint per message for that span."""
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
                    for unit in singles[i:end]:
                        self._one(unit, letters, blame)
                    i = end
                    break
                if failed == i:
                    msg, route, _ = singles[i]
                    letters.append(self._letter(msg, route, exc))
                    i += 1
                    break
                end = failed

    def _span(self, singles: list[Unit], start: int, end: int) -> tuple[int | None, BaseException | None]:
        """Run ``singles[start:end]`` in one savepoint: (None, None) when it was released,
        (k, exc) when unit k failed, (None, exc) when the span failed outside any unit."""
        from django.db import transaction

        dups_before = self._dups
        try:
            with transaction.atomic():
                # Per (message, route): a message may be a duplicate for one route's key only.
                todo, keys = self._dedupe(singles[start:end])
                kept = {id(u) for u in todo}
                for k in range(start, end):
                    unit = singles[k]
                    if id(unit) not in kept:
                        continue
                    try:
                        self._run_unit_call(unit[1], [unit])
                    except _TransactionLost:
                        raise
                    except Exception as exc:
                        raise _UnitFailed(k) from exc
                self._record(keys)
        except _TransactionLost:
            raise
        except _UnitFailed as failed:
            self._dups = dups_before            # counted again when the span runs again
            return failed.index, failed.__cause__
        except Exception as exc:  # noqa: BLE001 - the dedupe table, or the savepoint itself
            self._dups = dups_before
            return None, exc
        return None, None

    def _one(self, unit: Unit, letters: list[Letter], blame: bool) -> None:
        """Run one (message, route) in a savepoint; a failure becomes a dead letter."""
        from django.db import transaction

        msg, route, _ = unit
        try:
            with transaction.atomic():
                todo, keys = self._dedupe([unit])
                if todo:
                    self._run_unit_call(route, todo)
                    self._record(keys)
        except _TransactionLost:
            raise
        except Exception as exc:  # noqa: BLE001 - every handler error becomes a dead letter
            if is_outage(exc) and not blame:
                raise DatabaseUnavailable(str(exc)) from exc
            letters.append(self._letter(msg, route, exc))

    _letter = staticmethod(letter_for)
