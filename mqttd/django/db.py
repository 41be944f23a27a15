"""Database hygiene for the dispatcher, in one place: what an outage looks like, whether a handler
left the batch transaction usable, and the query a stuck handler is waiting in.

Nothing here imports models, so the daemon can use it before (and without) the ``mqttd.django``
app being installed.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

from mqttd.errors import HandlerContractError
from mqttd.ingest.tracing import handler_span

log = logging.getLogger("mqttd.dispatch")

# Statements that end or restart a transaction ("ROLLBACK TO SAVEPOINT" only undoes a savepoint).
_TX_CONTROL = re.compile(r"\s*(COMMIT|END|ABORT|BEGIN|START\s+TRANSACTION|ROLLBACK(?!\s+TO\b))\b", re.IGNORECASE)

# Driver transaction states (libpq's PQtransactionStatus, the same numbers in psycopg 2 and 3).
_PG_IDLE, _PG_INERROR = 0, 3


def is_outage(exc: BaseException | None) -> bool:
    """Is this the database being unavailable (rather than a handler's error)?"""
    from django.db import InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError))


def db_answers() -> bool:
    """Does the database answer ``SELECT 1`` right now (on a fresh check of the connection)?"""
    from django.db import close_old_connections, connection

    try:
        close_old_connections()
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        return True
    except Exception:  # noqa: BLE001
        return False


def close_broken() -> None:
    """After an outage: drop every connection that is not inside a transaction (Django never
    reopens a dead connection by itself)."""
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        try:
            if conn.in_atomic_block:
                continue
            conn.close()
        except Exception:  # noqa: BLE001 - the connection is already broken
            pass


def _driver_state(raw: Any, vendor: str) -> int | bool | None:
    """The driver's own view of the transaction: libpq's status on PostgreSQL, ``in_transaction``
    on SQLite, None where there is no cheap way to ask."""
    if vendor == "postgresql":
        pgconn = getattr(raw, "pgconn", None)               # psycopg 3
        if pgconn is not None:
            return int(pgconn.transaction_status)
        status = getattr(raw, "get_transaction_status", None)  # psycopg 2
        return int(status()) if status is not None else None
    if vendor == "sqlite":
        return bool(getattr(raw, "in_transaction", True))
    return None


class TransactionNotCommittable(Exception):
    """The batch transaction would be rolled back instead of committed."""


class TxGuard:
    """Checks, around every handler call, that the handler left the batch transaction usable.

    The handler contract: a handler must not end the batch's transaction. Django does not raise
    when one does: a swallowed database error only marks the transaction for rollback, and the
    batch's ``atomic()`` then rolls everything back *silently*; a closed connection loses the
    transaction and the next handler opens a new one in autocommit. So mqttd looks after each call
    (a few attribute reads) and fails that message with a ``HandlerContractError`` saying what the
    handler did and how to fix it; its neighbours are stored."""

    def __init__(self) -> None:
        from django.db import DEFAULT_DB_ALIAS, connections

        self._connections = connections
        self._alias = DEFAULT_DB_ALIAS
        self._active: str | None = None      # the route whose handler is running
        self._refused: str | None = None     # a transaction-control statement it tried

    def __call__(self, execute, sql, params, many, context):  # noqa: ANN001, ANN204 - Django's execute wrapper
        """Refuse COMMIT / ROLLBACK / BEGIN sent through Django's cursor while a handler runs:
        prevented, the batch transaction stays whole (the check in ``after`` only finds what a
        handler did through the driver itself, when it is too late to undo)."""
        if self._active is not None and isinstance(sql, str) and _TX_CONTROL.match(sql):
            self._refused = sql.strip().split(None, 1)[0].upper()
            raise HandlerContractError(
                f"handler {self._active} tried to end the batch transaction itself ({self._refused}); refused. "
                "mqttd commits once per batch, after every handler, and acknowledges only then: remove it, and "
                "use `with transaction.atomic():` blocks for work that must succeed or fail together")
        return execute(sql, params, many, context)

    @property
    def _conn(self) -> Any:
        return self._connections[self._alias]

    def begin(self) -> None:
        """Make the batch transaction start now (PostgreSQL begins lazily, on the first query), so
        that a handler that ends it can be told apart from one that never touched the database."""
        conn = self._conn
        if self not in conn.execute_wrappers:        # once per thread's connection object
            conn.execute_wrappers.append(self)
        if conn.vendor == "postgresql" and _driver_state(conn.connection, conn.vendor) == _PG_IDLE:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")

    def before_commit(self) -> None:
        """Last thing inside the batch's ``atomic()``.

        1. ``on_commit`` hooks a handler registered are made robust: Django runs them *after* the
           COMMIT, inside ``atomic().__exit__``, and a raising one (``publish_on_commit`` with the
           broker away) would otherwise make a committed batch look failed, to be run and committed
           again and again. Django logs the error of a robust hook and goes on.
        2. Raise if Django would roll the transaction back silently on exit (a rollback mark nobody
           was blamed for, a connection lost in the transaction): a batch is never taken for
           committed, and acked, when it was not."""
        conn = self._conn
        if conn.run_on_commit:
            conn.run_on_commit = [(sids, func, True) for sids, func, *_ in conn.run_on_commit]
        if conn.needs_rollback or conn.closed_in_transaction or conn.connection is None:
            raise TransactionNotCommittable("the batch transaction cannot be committed (marked for rollback or "
                                            "its connection closed)")

    def before(self, route: str) -> Any:
        """A token describing the transaction before a handler call of ``route``."""
        conn = self._conn
        raw = conn.connection
        self._active, self._refused = route, None
        return raw, (_driver_state(raw, conn.vendor) if raw is not None else None)

    def call(self, route: Any, msgs: list[Any]) -> None:
        """Run ``route``'s handler on ``msgs`` and raise the contract violation it committed, if
        any, also when it raised (it may have closed the connection first): the one guarded call
        that the batch runner and ``mqttd replay`` both make."""
        with handler_span(route, msgs):
            token = self.before(route.name)
            try:
                route.invoke(msgs)
            except Exception as exc:
                broken = self.after(route.name, token, raised=exc)
                if broken is not None:
                    raise broken from exc
                raise
            broken = self.after(route.name, token)
            if broken is not None:
                raise broken

    def after(self, route: str, token: Any, raised: BaseException | None = None) -> HandlerContractError | None:
        """The contract violation of the call that just ended, if any. ``raised``: the exception
        the handler raised; it is the message's failure anyway, unless the handler destroyed the
        transaction before raising it, which must be known (the batch cannot go on in it)."""
        conn = self._conn
        raw_before, state_before = token
        refused, self._active, self._refused = self._refused, None, None
        also = f" (and then raised {type(raised).__name__}: {raised})" if raised is not None else ""
        if conn.closed_in_transaction or conn.connection is None or conn.connection is not raw_before \
                or not conn.in_atomic_block:
            return HandlerContractError(
                f"handler {route} closed the database connection inside the batch transaction "
                "(connection.close() or close_old_connections() in a handler), which rolled back everything "
                "the batch had written. mqttd opens, checks and closes connections around every batch: "
                f"remove that call from the handler{also}", lost=True)
        state = _driver_state(conn.connection, conn.vendor)
        ended = state is not None and state_before is not None and state != state_before and \
            (state is False if conn.vendor == "sqlite" else state == _PG_IDLE)
        if ended:
            return HandlerContractError(
                f"handler {route} ended the batch transaction itself (COMMIT or ROLLBACK on the connection): "
                "mqttd commits once per batch, after every handler, and acknowledges only then. Remove it; "
                f"use `with transaction.atomic():` blocks for work that must succeed or fail together{also}",
                lost=True)
        if raised is not None:
            return None
        if refused is not None:        # it caught our refusal and went on
            return HandlerContractError(
                f"handler {route} tried to end the batch transaction itself ({refused}); refused. mqttd commits "
                "once per batch, after every handler, and acknowledges only then: remove it")
        if conn.needs_rollback:
            return HandlerContractError(
                f"handler {route} swallowed a database error: an exception inside a query or a model "
                "save/update/delete was caught inside the batch transaction (for example `except "
                "IntegrityError: pass`), so Django marked the whole transaction for rollback. Wrap the "
                "statement that may fail in its own `with transaction.atomic():` inside the try, so that "
                "only it is rolled back")
        if conn.vendor == "postgresql" and state == _PG_INERROR:
            return HandlerContractError(
                f"handler {route} swallowed a database error: a query failed and its exception was caught, "
                "leaving the transaction aborted. Wrap the statement that may fail in its own "
                "`with transaction.atomic():` inside the try")
        return None


class QueryClock:
    """Which query the dispatcher thread is waiting in, for the watchdog (a Django execute
    wrapper on the dispatcher's connections).

    A handler past ``dispatch.handler_timeout`` inside a query is waiting on the database (a lock
    held elsewhere, an overloaded server), not hung in its own code: the watchdog cancels the
    query, the batch is retried as for an outage, and the message is not poisoned."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: tuple[Any, str, float] | None = None     # (driver connection, vendor, since)
        self.cancelled_call: float | None = None    # the handler call (its start) whose query was cancelled
        self.cancelled_at: float | None = None

    def install(self) -> None:
        """Wrap every query of the calling thread's connections (call on the dispatcher thread)."""
        from django.db import connections

        for alias in connections:
            conn = connections[alias]
            if self not in conn.execute_wrappers:
                conn.execute_wrappers.append(self)

    def __call__(self, execute, sql, params, many, context):  # noqa: ANN001, ANN204 - Django's signature
        conn = context["connection"]
        with self._lock:
            self._current = (conn.connection, conn.vendor, time.monotonic())
        try:
            return execute(sql, params, many, context)
        finally:
            with self._lock:
                self._current = None

    def waiting_since(self) -> float | None:
        """Monotonic start of the query in progress, if the dispatcher is inside one."""
        cur = self._current
        return cur[2] if cur is not None else None

    def cancel(self, call: float) -> bool:
        """Ask the database to cancel the query in progress of handler call ``call`` (its start
        time), from another thread. Returns False where the backend has no way to (the caller
        then treats the handler as hung)."""
        with self._lock:
            cur = self._current
            if cur is None:
                return False
            raw, vendor, _ = cur
            if vendor == "postgresql" and hasattr(raw, "cancel"):
                cancel_query = raw.cancel
            elif vendor == "sqlite" and hasattr(raw, "interrupt"):
                cancel_query = raw.interrupt
            else:
                return False
            self.cancelled_call, self.cancelled_at = call, time.monotonic()

        def run() -> None:
            try:
                cancel_query()
            except Exception as exc:  # noqa: BLE001 - the watchdog sees the query still running
                log.warning("could not cancel the query in progress: %s", exc)

        # A cancel opens a connection of its own on PostgreSQL: never block the watchdog on it.
        threading.Thread(target=run, name="mqttd-cancel", daemon=True).start()
        return True
