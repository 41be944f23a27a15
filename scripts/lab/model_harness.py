"""A model-based check of the message path (issue 14): Router -> Deduper -> BatchRunner ->
DeadLetterSink (model mode) -> Dispatcher -> acks, against a real Django database.

Django is set up once per process, so this module is driven by ``scripts/modelcheck`` (which
creates the database, sets up Django and calls :func:`run`); it is not a pytest module itself.

The world
---------
* The MQTT session is a stub :class:`StubAcker` and a model broker (:class:`Harness`): every
  published message is un-acked until acked on the connection (``generation``) it was delivered
  on; a new connection (a reconnect, or a new process after a kill or a hang) redelivers every
  un-acked message in publish order with fresh packet ids.
* Five routes on overlapping filters (per-message and ``batch=True``, two with ``dedupe=``)::

      S   s/{dev}           per-message            topics s/dN   -> S + SB
      SB  s/{rest...}       batch=True             topics s/dN/z -> SB only
      K   k/{dev}           per-message, dedupe    topics k/dN   -> K + KB
      KB  k/{rest...}       batch=True, dedupe     topics k/dN/z -> KB only
      L   l/{rest...}       per-message            topics l/short, l/<1100 chars>
                                                   topics u/dN   -> no route

* A message's payload (JSON) says what each matched route's handler does with it, so a
  redelivery behaves the same. Every handler first writes its *effect* (a ``Reading`` row with
  seq = message id, source = route code), then:

      ok       nothing more
      raise    raises ValueError
      swallow  ``try: Strict.objects.create(code=EXISTING) except IntegrityError: pass``
      close    ``connection.close(); close_old_connections()``
      commit   ``cursor.execute("COMMIT")`` (the handler ends the transaction itself)
      hang     runs past the handler timeout: the watchdog records the call in flight
               (``Dispatcher.current``) in the PoisonList and the process dies

  plus a dedupe key (small range, so keys repeat; or one whose key function raises), and an
  oversized payload (over ``max_payload``).
* Faults per step: a database outage from a random SQL statement on (``OperationalError`` for the
  next k statements, from ``connection.execute_wrapper``), the process killed at a random SQL
  statement or in the middle of the acks (a BaseException: everything in memory is dropped, the
  connection is closed without commit, a new Dispatcher is built, the broker redelivers).

Invariants (each a distinct *kind*; see ``INVARIANTS``) are checked at every ack (against the
committed state, through a separate database connection), inside every handler call, after
every step, and after a final drain.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

# ---------------------------------------------------------------------------------------------
# What the model knows

CODES = ("S", "SB", "K", "KB", "L")
ROUTE_NAME = {c: f"model.{c}" for c in CODES}
CODE_OF = {v: k for k, v in ROUTE_NAME.items()}
KEYED = {"K", "KB"}
BATCH = {"SB", "KB"}
LONG_TOPIC = "l/" + "x" * 1100          # over DeadLetter.topic's 1024 (MQTT allows 65,535 bytes)
MAX_PAYLOAD = 512
BIG_PAD = 600
HANDLER_TIMEOUT = 30.0
EXISTING = "EXISTING"                   # the Strict row that makes `swallow` raise IntegrityError

# kind -> (topic template, routes it matches, in match order)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "s": ("s/d{dev}", ("S", "SB")),
    "sz": ("s/d{dev}/z", ("SB",)),
    "k": ("k/d{dev}", ("K", "KB")),
    "kz": ("k/d{dev}/z", ("KB",)),
    "l": ("l/d{dev}", ("L",)),
    "L": (LONG_TOPIC, ("L",)),
    "u": ("u/d{dev}", ()),
}
BEHAVIOURS = ("ok", "raise", "swallow", "close", "commit", "hang")
CONTRACT = {"swallow", "close", "commit"}   # breaks the handler contract without raising

INVARIANTS = {
    "ack-generation": "an ack names the (connection, packet id) that delivered the message (acks of an "
                      "earlier connection are dropped by the acker, as the session does)",
    "ack-order": "acks leave in arrival order per connection, each message once",
    "ack-foreign": "the acker is only given messages of the batch being processed",
    "ack-before-commit": "an acked message has, for every route it matched, its effect committed, a "
                         "committed dead letter naming the route, or a recorded duplicate (dedupe)",
    "batch-not-acked": "process() returned True but did not ack every message of the batch",
    "key-once": "a keyed route's effect is committed at most once per dedupe key",
    "key-without-effect": "a recorded dedupe key has its route's effect committed (else a later "
                          "duplicate is skipped into nothing)",
    "effect-per-delivery": "a route's effect is committed at most once per delivery of a message",
    "letter-per-delivery": "at most one dead letter per (message, route) per delivery",
    "ok-dead-lettered": "a message whose behaviour is ok never becomes a dead letter (unless set "
                        "aside: oversized, or poisoned after a hang)",
    "failed-has-effect": "a handler call that failed leaves no effect",
    "setaside-has-effect": "a message set aside (oversized) leaves no effect",
    "wrong-route": "a handler only ever runs on (and a dead letter only names) routes its message matched",
    "contract-error-text": "a handler that swallowed a DB error / closed the connection / committed has "
                           "its message dead-lettered with an error that says what the handler did",
    "letter-content": "a dead letter stores the message's topic and payload as received",
    "setaside-run": "a handler never runs on a message set aside (oversized, or poisoned alone)",
    "current-not-call": "Dispatcher.current names exactly the handler call in flight (the watchdog "
                        "records it as poison)",
    "current-left-set": "Dispatcher.current is None when no handler runs (during outage backoff, "
                        "after process()) - else the watchdog poisons innocent messages",
    "params": "a handler gets its own route's params",
    "wedged": "a batch commits once the database is back (it is retried forever instead)",
    "dispatcher-died": "process() never raises: a dispatcher thread that dies restarts the process",
    "unacked-at-end": "once the database is back and everything is delivered, nothing stays un-acked",
    "accounts-once": "a committed batch settles each of its messages in exactly one outcome (handled, dead "
                     "letter, duplicate, unrouted, canary: mqttd.ingest.stats), one that was not settles none",
    "accounts-unrouted": "a message that matched no route is counted unrouted, and only such a message",
}


# The outcome counters of docs/operations.md (mqttd.ingest.stats.OUTCOMES), spelt out so that --mqttd-src can
# check an older tree too (one without them counts 0, and its accounts are reported as not adding up).
OUTCOMES = ("handled", "dead_letters", "duplicates_skipped", "unrouted", "canary")


def _settled(stats: Any) -> dict[str, int]:
    return {k: getattr(stats, k, 0) for k in OUTCOMES}


class Violation(AssertionError):
    kind = "?"


_VCLASSES: dict[str, type[Violation]] = {}


def violation_class(kind: str) -> type[Violation]:
    """One exception class per kind, so that Hypothesis shrinks each kind to its own example."""
    cls = _VCLASSES.get(kind)
    if cls is None:
        name = "Violation_" + re.sub(r"\W", "_", kind)
        cls = type(name, (Violation,), {"kind": kind})
        _VCLASSES[kind] = cls
    return cls


class _Kill(BaseException):
    """The process is killed (SIGKILL): nothing after this point runs."""


class _Hang(BaseException):
    """A handler ran past the handler timeout: the watchdog recorded it and the process exits."""


@dataclass(frozen=True)
class Spec:
    """One message as Hypothesis generates it."""

    kind: str
    dev: int
    beh: tuple[str, str]            # behaviour on the first and second route the topic matches
    key: int | None                 # dedupe key (routes K, KB); -1: the key function raises
    big: bool

    def __repr__(self) -> str:
        routes = KINDS[self.kind][1]
        b = ",".join(f"{c}={self.beh[i]}" for i, c in enumerate(routes))
        extra = ""
        if routes and routes[0] in KEYED:
            extra += f" key={'RAISES' if self.key == -1 else self.key}"
        if self.big:
            extra += " BIG"
        return f"M({KINDS[self.kind][0].format(dev=self.dev)[:12]!r} {b or 'unrouted'}{extra})"


@dataclass
class Info:
    uid: int
    spec: Spec
    topic: str
    payload: bytes
    routes: tuple[str, ...]
    beh: dict[str, str]
    key: str | None                 # None: no key; "!" the key function raises
    deliveries: int = 0

    @property
    def big(self) -> bool:
        return self.spec.big

    @property
    def hangs(self) -> bool:
        return "hang" in self.beh.values()


# ---------------------------------------------------------------------------------------------
# Strategies

_beh = st.sampled_from(("ok",) * 6 + ("raise", "raise", "swallow", "close", "commit", "hang"))


def spec_strategy(behaviours: tuple[str, ...]) -> st.SearchStrategy[Spec]:
    beh = _beh.filter(lambda b: b in behaviours) if set(behaviours) != set(BEHAVIOURS) else _beh
    return st.builds(
        Spec,
        kind=st.sampled_from(("s", "s", "sz", "k", "k", "kz", "l", "u", "L")),
        dev=st.integers(1, 2),
        beh=st.tuples(beh, beh),
        key=st.one_of(st.integers(0, 3), st.none(), st.just(-1)),
        big=st.integers(0, 9).map(lambda n: n == 9),
    )


@dataclass(frozen=True)
class Fault:
    what: str          # "outage" | "kill" | "ackkill"
    at: int            # the SQL statement of this step it starts at (ackkill: acks sent before it)
    k: int = 0         # outage: how many statements fail

    def __repr__(self) -> str:
        if self.what == "outage":
            return f"Outage(at_stmt={self.at}, failing={self.k})"
        if self.what == "kill":
            return f"Kill(at_stmt={self.at})"
        return f"KillInAcks(after={self.at})"


faults = st.one_of(
    st.none(), st.none(),
    st.builds(Fault, st.just("outage"), st.integers(1, 40), st.integers(1, 9)),
    st.builds(Fault, st.just("kill"), st.integers(1, 40)),
    st.builds(Fault, st.just("ackkill"), st.integers(0, 6)),
)


# ---------------------------------------------------------------------------------------------
# The harness: one per process (Django is set up once)

class _Backoff(threading.Event):
    """The Dispatcher's stop_event: its wait() is the outage backoff. Checks that no handler call
    is recorded in flight while the dispatcher waits, and stops a batch that is retried forever
    although the database is up (so the model reports a wedge instead of hanging)."""

    def __init__(self, harness: Harness) -> None:
        super().__init__()
        self.h = harness

    def wait(self, timeout: float | None = None) -> bool:
        h = self.h
        d = h.dispatcher
        if d is not None and d.current is not None:
            msgs, route, _ = d.current
            h.flag("current-left-set", f"Dispatcher.current = ({[h.label(m) for m in msgs]}, {route.name}) "
                   "while the dispatcher waits out a database outage: a watchdog would record it as a hang "
                   "and poison it")
        h.backoffs += 1
        if h.backoffs > h.backoff_budget:
            h.wedged = True
            return True          # Dispatcher.process returns False: "stopped during an outage"
        return False


class StubAcker:
    def __init__(self, harness: Harness) -> None:
        self.h = harness

    def ack(self, messages: list) -> None:
        self.h.on_ack(messages)

    def is_current(self, message) -> bool:  # noqa: ANN001
        return message.generation == self.h.gen


class Harness:
    def __init__(self, engine: str, db_name: str, workdir: Path, behaviours: tuple[str, ...] = BEHAVIOURS) -> None:
        from django.db import connections

        self.engine, self.db_name, self.workdir = engine, db_name, workdir
        self.behaviours = behaviours
        self.poison_path = workdir / "model.poison.json"
        self.jsonl_path = workdir / "deadletter.jsonl"
        self.suppressed: set[str] = set()
        self.seen: Counter[str] = Counter()      # kind -> examples in which it occurred
        self.cases = 0                           # test cases run (shrinking included)
        self.examples = 0                        # of which generated while searching
        self.first_failure_at: int | None = None
        self.steps = 0
        self.batches = 0
        self.stale_acks = 0
        self.log: list[str] = []
        self.started = time.monotonic()
        self.slow: float | None = None           # report test cases slower than this (seconds)
        self._case_start, self._case_batches = self.started, 0
        self._checker = None
        self.routes = self._routes()
        self.dispatcher = None
        self._install_wrapper(connections["default"])

    # ---- routes and handlers ---------------------------------------------------------------------
    def _routes(self) -> list:
        from mqttd.router import Route
        from mqttd.topics import TopicFilter

        def keyfn(msg) -> str | None:
            info = self.info(msg)
            if info.key == "!":
                raise ValueError("model: the dedupe key function raises on this message")
            return info.key

        def single(code: str):
            def handler(msg, **params):
                info = self.enter([msg], code)
                self.check_params(code, info, params)
                self.act(info, code, msg)
            handler.__qualname__ = handler.__name__ = f"handler_{code}"
            return handler

        def batch(code: str):
            def handler(msgs):
                from sensors.models import Reading

                self.enter(msgs, code)
                rows = []
                for m in msgs:
                    info = self.info(m)
                    self.check_params(code, info, m.params)
                    if info.beh.get(code, "ok") == "ok":
                        rows.append(Reading(device=f"u{info.uid}", seq=info.uid, source=code))
                        continue
                    if rows:
                        Reading.objects.bulk_create(rows)
                        rows = []
                    self.act(info, code, m)
                if rows:
                    Reading.objects.bulk_create(rows)
            handler.__qualname__ = handler.__name__ = f"handler_{code}"
            return handler

        tf = TopicFilter.parse
        return [
            Route(tf("s/{dev}"), single("S"), qos=1, name=ROUTE_NAME["S"]),
            Route(tf("s/{rest...}"), batch("SB"), qos=1, batch=True, name=ROUTE_NAME["SB"]),
            Route(tf("k/{dev}"), single("K"), qos=1, dedupe=keyfn, name=ROUTE_NAME["K"]),
            Route(tf("k/{rest...}"), batch("KB"), qos=1, batch=True, dedupe=keyfn, name=ROUTE_NAME["KB"]),
            Route(tf("l/{rest...}"), single("L"), qos=1, name=ROUTE_NAME["L"]),
        ]

    def info(self, msg) -> Info:
        return self.msgs[json.loads(msg.payload)["id"]]

    def label(self, msg) -> str:
        try:
            return f"#{self.info(msg).uid}"
        except Exception:  # noqa: BLE001
            return repr(msg)

    def enter(self, msgs: list, code: str) -> Info:
        """Checks at the start of every handler call."""
        d = self.dispatcher
        cur = d.current if d is not None else None
        want = [(m.topic, m.payload) for m in msgs]
        if cur is None or cur[1].name != ROUTE_NAME[code] or [(m.topic, m.payload) for m in cur[0]] != want:
            got = "None" if cur is None else f"({[self.label(m) for m in cur[0]]}, {cur[1].name})"
            self.flag("current-not-call", f"handler {code} runs on {[self.label(m) for m in msgs]} but "
                      f"Dispatcher.current is {got}")
        info = None
        for m in msgs:
            info = self.info(m)
            if code not in info.routes:
                self.flag("wrong-route", f"handler {code} ran on #{info.uid} ({info.topic[:20]}) which only "
                          f"matches {info.routes}")
            if info.big:
                self.flag("setaside-run", f"handler {code} ran on #{info.uid} whose payload exceeds max_payload")
            if info.uid in self.poisoned_alone:
                self.flag("setaside-run", f"handler {code} ran again on #{info.uid}, which hung alone before "
                          "(poison): 'the handler is not run on it again'")
        return info  # type: ignore[return-value]

    def check_params(self, code: str, info: Info, params: dict) -> None:
        parts = info.topic.split("/")
        want = {"dev": parts[1]} if code in ("S", "K") else {"rest": "/".join(parts[1:])}
        if dict(params) != want:
            self.flag("params", f"handler {code} got params {params!r} for #{info.uid} ({info.topic[:20]}), "
                      f"expected {want!r}")

    def act(self, info: Info, code: str, msg) -> None:
        """Write the effect, then do what the payload says."""
        from django.db import IntegrityError, close_old_connections, connection
        from sensors.models import Reading, Strict

        beh = info.beh.get(code, "ok")
        Reading.objects.create(device=f"u{info.uid}", seq=info.uid, source=code)
        if beh == "ok":
            return
        if beh == "raise":
            raise ValueError(f"model: handler {code} told to fail on #{info.uid}")
        if beh == "swallow":
            try:
                Strict.objects.create(code=EXISTING)
            except IntegrityError:
                pass
            return
        if beh == "close":
            connection.close()
            close_old_connections()
            return
        if beh == "commit":
            with connection.cursor() as cur:
                cur.execute("COMMIT")
            return
        if beh == "hang":
            self.hang()
        raise AssertionError(beh)

    def hang(self) -> None:
        """What the daemon's watchdog does when a handler runs past handler_timeout."""
        d = self.dispatcher
        cur = d.current
        if cur is not None:
            msgs, route, _ = cur
            d.poison.record_hang(msgs, route.name, HANDLER_TIMEOUT)
            if len(msgs) == 1:
                self.poisoned_alone.add(self.info(msgs[0]).uid)
        raise _Hang()

    # ---- fault injection -------------------------------------------------------------------------
    def _install_wrapper(self, conn) -> None:
        if self._wrapper not in conn.execute_wrappers:
            conn.execute_wrappers.append(self._wrapper)

    def _wrapper(self, execute, sql, params, many, context):
        if self.dead:
            raise _Kill("the process is dead")
        if self.injecting:
            self.stmts += 1
            f = self.fault
            if f is not None and f.what == "kill" and self.stmts >= f.at:
                self.fault = None
                self.dead = True
                raise _Kill(f"killed at SQL statement {self.stmts}: {sql[:60]}")
            if f is not None and f.what == "outage" and self.stmts >= f.at and self.outage_left > 0:
                from django.db import OperationalError

                self.outage_left -= 1
                context["connection"].errors_occurred = True
                raise OperationalError("model: injected outage (server closed the connection unexpectedly)")
        return execute(sql, params, many, context)

    # ---- the broker and the process --------------------------------------------------------------
    def new_example(self) -> None:
        now = time.monotonic()
        if self.slow is not None and self.cases and now - self._case_start > self.slow:
            import sys

            print(f"modelcheck: slow test case {self.cases}: {now - self._case_start:.1f}s "
                  f"({self.batches - self._case_batches} batches)", file=sys.stderr, flush=True)
        self._case_start, self._case_batches = now, self.batches
        if self.slow is not None:
            import sys

            if getattr(self, "_timer", None) is not None:
                self._timer.cancel()
            log = self.log = []
            self._timer = threading.Timer(self.slow * 5, lambda: print("modelcheck: stuck test case:\n  "
                                          + "\n  ".join(log), file=sys.stderr, flush=True))
            self._timer.daemon = True
            self._timer.start()
        self.cases += 1
        self.msgs: dict[int, Info] = {}
        self.unacked: dict[int, None] = {}            # publish order
        self.queue: list[int] = []                     # to deliver on the current connection
        self.gen = 0
        self.arrival: dict[tuple[int, int], tuple[int, int]] = {}  # (gen, mid) -> (arrival index, uid)
        self.last_acked: dict[int, int] = {}
        self.acked_ever: set[int] = set()
        self.poisoned_alone: set[int] = set()
        self.in_batch: set[int] = set()
        self.pending: list[tuple[str, str]] = []
        self.kinds_here: set[str] = set()
        self.fault: Fault | None = None
        self.outage_left = 0
        self.injecting = False
        self.dead = False
        self.stmts = 0
        self.backoffs = 0
        self.backoff_budget = 0
        self.wedged = False
        self.failed = False
        self.tainted = False
        self._kill_process()
        self._reset_db()
        if self.poison_path.exists():
            self.poison_path.unlink()
        self._start_process()

    def _reset_db(self) -> None:
        c = self.checker
        for table in ("sensors_reading", "sensors_strict", "mqttd_deadletter", "mqttd_processedkey"):
            c.execute(f"DELETE FROM {table}")
        c.execute(f"INSERT INTO sensors_strict (code) VALUES ('{EXISTING}')")

    def _kill_process(self) -> None:
        """Everything in memory is gone; the database rolls back what was not committed."""
        from django.db import connections

        self.dispatcher = None
        try:
            conn = connections["default"]
            raw = conn.connection
            if raw is not None:
                raw.close()
        except Exception:  # noqa: BLE001
            pass
        del connections["default"]          # a fresh DatabaseWrapper, as in a new process
        self._install_wrapper(connections["default"])
        self.dead = False

    def _start_process(self) -> None:
        """A new process: a new Dispatcher (the poison list is read back from its file), and a new
        connection to the broker, which redelivers everything un-acked."""
        from mqttd.ingest.deadletters import DeadLetterSink
        from mqttd.ingest.dispatch import Dispatcher
        from mqttd.ingest.intake import Intake
        from mqttd.ingest.poison import PoisonList
        from mqttd.ingest.stats import Stats
        from mqttd.router import Router

        d = Dispatcher(Router(list(self.routes)), Intake(), StubAcker(self), DeadLetterSink(self.jsonl_path, True),
                       Stats(), batch_size=64, linger=0.0, max_payload=MAX_PAYLOAD,
                       poison=PoisonList(self.poison_path), outage_backoff=(0.001, 0.005))
        d.stop_event = _Backoff(self)
        self.dispatcher = d
        self._reconnect()

    def _reconnect(self) -> None:
        self.gen += 1
        self.next_mid = 0
        self.queue = list(self.unacked)

    def restart(self) -> None:
        self.log.append("restart")
        self._kill_process()
        self._start_process()

    def publish(self, spec: Spec) -> int:
        uid = len(self.msgs) + 1
        tmpl, routes = KINDS[spec.kind]
        topic = tmpl.format(dev=spec.dev)
        beh = {c: spec.beh[i] for i, c in enumerate(routes)}
        key = None
        if routes and routes[0] in KEYED and spec.key is not None:
            key = "!" if spec.key == -1 else f"key{spec.key}"
        body = {"id": uid, "b": beh, "k": key}
        if spec.big:
            body["pad"] = "x" * BIG_PAD
        payload = json.dumps(body).encode()
        self.msgs[uid] = Info(uid, spec, topic, payload, routes, beh, key)
        self.unacked[uid] = None
        self.queue.append(uid)
        return uid

    def arrive(self, uid: int):
        from mqttd.message import Message

        info = self.msgs[uid]
        self.next_mid = self.next_mid % 65535 + 1
        self.arrival[(self.gen, self.next_mid)] = (len(self.arrival), uid)
        info.deliveries += 1
        return Message(info.topic, info.payload, qos=1, mid=self.next_mid, dup=info.deliveries > 1,
                       received_at=time.time(), generation=self.gen)

    def run_batch(self, uids: list[int], fault: Fault | None) -> None:
        if not uids:
            return
        batch = [self.arrive(u) for u in uids]
        self.log.append(f"batch {[f'#{u} {self.msgs[u].spec!r}' for u in uids]} gen={self.gen} fault={fault!r}")
        self.process(batch, fault)

    def process(self, batch: list, fault: Fault | None) -> None:
        self.batches += 1
        self.fault = fault
        self.outage_left = fault.k if fault is not None and fault.what == "outage" else 0
        self.stmts = 0
        self.backoffs = 0
        self.backoff_budget = self.outage_left + 12
        self.wedged = False
        self.in_batch = {id(m) for m in batch}
        self.batch_msgs = batch
        self.acks_this_batch = 0
        d = self.dispatcher
        settled_before = _settled(d.stats)
        self.injecting = True
        try:
            ok = d.process(batch)
        except (_Kill, _Hang):
            self.injecting = False
            self.restart()
            return
        except Exception as exc:  # noqa: BLE001
            self.injecting = False
            self.flag("dispatcher-died", f"Dispatcher.process raised {type(exc).__name__}: {exc}")
            self.restart()
            return
        finally:
            self.injecting = False
            self.fault = None
            self.in_batch = set()
        if d.current is not None:
            self.flag("current-left-set", "Dispatcher.current is still set after process() returned")
        if not ok:
            if _settled(d.stats) != settled_before:
                self.flag("accounts-once", "a batch that was not acked changed the outcome counters")
            what = "retried" if self.wedged else "stopped"
            self.flag("wedged", f"a batch of {[self.label(m) for m in batch]} was {what} {self.backoffs} times "
                      f"(outage over after {fault.k if fault and fault.what == 'outage' else 0} statements) "
                      "and never committed: the stream is blocked")
            self.restart()
            return
        not_acked = [self.label(m) for m in batch if m.generation == self.gen and self.info(m).uid in self.unacked]
        if not_acked:
            self.flag("batch-not-acked", f"process() returned True but {not_acked} were not acked")
        grew = {k: v - settled_before[k] for k, v in _settled(d.stats).items()}
        if sum(grew.values()) != len(batch):
            self.flag("accounts-once", f"a batch of {len(batch)} committed, but the outcome counters grew by {grew}")
        unrouted = sum(1 for m in batch if not self.info(m).routes)
        if grew["unrouted"] != unrouted:
            self.flag("accounts-unrouted", f"{unrouted} messages matched no route, {grew['unrouted']} counted unrouted")

    def on_ack(self, messages: list) -> None:
        f = self.fault
        committed = self.committed_state()
        for m in messages:
            if f is not None and f.what == "ackkill" and self.acks_this_batch >= f.at:
                self.fault = None
                raise _Kill("killed while sending acks")
            self.acks_this_batch += 1
            info = self.info(m)
            if id(m) not in self.in_batch:
                self.flag("ack-foreign", f"ack of #{info.uid} which is not in the batch being processed")
            idx, uid = self.arrival.get((m.generation, m.mid), (-1, None))
            if uid != info.uid:
                self.flag("ack-generation", f"ack of #{info.uid} as (connection {m.generation}, mid {m.mid}), "
                          "which did not deliver it: it would acknowledge another message")
                continue
            if m.generation != self.gen:
                self.stale_acks += 1
                continue            # the session drops acks of an earlier connection (docs/delivery.md)
            last = self.last_acked.get(m.generation, -1)
            if idx <= last:
                self.flag("ack-order", f"ack of #{info.uid} (mid {m.mid}, arrival {idx}) after arrival {last} "
                          f"on connection {m.generation}")
            self.last_acked[m.generation] = max(idx, last)
            self.check_outcome(info, committed, "at its ack")
            self.unacked.pop(info.uid, None)
            self.acked_ever.add(info.uid)

    # ---- checking against the committed state ----------------------------------------------------
    @property
    def checker(self):
        if self._checker is None:
            if self.engine == "sqlite":
                import sqlite3

                self._checker = sqlite3.connect(self.db_name, isolation_level=None, timeout=30)
            else:
                import psycopg

                from lab.db import PG

                self._checker = psycopg.connect(dbname=self.db_name, autocommit=True, **PG)
        return self._checker

    def committed_state(self) -> dict[str, Any]:
        c = self.checker
        effects: Counter = Counter()
        for seq, source, n in c.execute("SELECT seq, source, COUNT(*) FROM sensors_reading GROUP BY seq, source"):
            effects[(int(seq), source)] += n
        letters: dict[tuple[int, str], list[tuple[str, str]]] = defaultdict(list)
        bad_letters = []
        for topic, payload, route, error in c.execute("SELECT topic, payload, route, error FROM mqttd_deadletter"):
            payload = bytes(payload)
            try:
                uid = json.loads(payload)["id"]
                info = self.msgs[uid]
            except Exception:  # noqa: BLE001
                bad_letters.append((topic[:40], payload[:40]))
                continue
            if topic != info.topic or payload != info.payload:
                bad_letters.append((topic[:40], payload[:40]))
            letters[(uid, CODE_OF.get(route, route))].append((route, error))
        keys = {(CODE_OF.get(r, r), k) for r, k in c.execute("SELECT route, key FROM mqttd_processedkey")}
        return {"effects": effects, "letters": letters, "keys": keys, "bad_letters": bad_letters}

    def check_outcome(self, info: Info, state: dict, when: str) -> None:
        for code in info.routes:
            if state["effects"][(info.uid, code)] or state["letters"].get((info.uid, code)):
                continue
            if code in KEYED and info.key not in (None, "!") and (code, info.key) in state["keys"]:
                continue
            self.flag("ack-before-commit", f"#{info.uid} {info.spec!r} acked ({when}) but for route {code} there is "
                      "no committed effect, no dead letter naming the route and no recorded duplicate")

    def check_state(self) -> None:
        state = self.committed_state()
        effects, letters, keys = state["effects"], state["letters"], state["keys"]
        for t, p in state["bad_letters"]:
            self.flag("letter-content", f"dead letter topic {t!r} payload {p!r} is not a message as received")
        per_key: Counter = Counter()
        for (uid, code), n in effects.items():
            info = self.msgs.get(uid)
            if info is None:
                continue
            if code not in info.routes:
                self.flag("wrong-route", f"effect of route {code} for #{uid} which only matches {info.routes}")
                continue
            beh = info.beh[code]
            if beh != "ok" or (code in KEYED and info.key == "!"):
                what = beh if beh != "ok" else "key function raised"
                self.flag("failed-has-effect", f"#{uid} {info.spec!r}: route {code} failed ({what}) but its "
                          f"effect is committed ({n} row(s))")
            if info.big:
                self.flag("setaside-has-effect", f"#{uid} {info.spec!r} is over max_payload but route {code} "
                          "committed an effect")
            if n > info.deliveries:
                self.flag("effect-per-delivery", f"#{uid} {info.spec!r}: route {code} effect committed {n} times "
                          f"in {info.deliveries} deliveries")
            if code in KEYED and info.key not in (None, "!"):
                per_key[(code, info.key)] += n
        for (code, key), n in per_key.items():
            if n > 1:
                self.flag("key-once", f"route {code} key {key!r}: effect committed {n} times")
        for code, key in keys:
            if per_key[(code, key)] == 0:
                self.flag("key-without-effect", f"route {code} key {key!r} recorded as processed but no "
                          "effect of that key is committed")
        for (uid, code), rows in letters.items():
            info = self.msgs[uid]
            if code not in info.routes:
                self.flag("wrong-route", f"dead letter for #{uid} names route {rows[0][0]!r}; the message "
                          f"matches {info.routes}")
                continue
            if len(rows) > info.deliveries:
                self.flag("letter-per-delivery", f"#{uid} {info.spec!r}: {len(rows)} dead letters for route {code} "
                          f"in {info.deliveries} deliveries")
            setaside = info.big or info.hangs
            if info.beh[code] == "ok" and not (code in KEYED and info.key == "!") and not setaside:
                self.flag("ok-dead-lettered", f"#{uid} {info.spec!r}: route {code} is ok but dead-lettered: "
                          f"{rows[0][1][:300]!r}")
        for uid in self.acked_ever:
            info = self.msgs[uid]
            if info.big or info.hangs:
                continue
            for code in info.routes:
                beh = info.beh[code]
                if beh not in CONTRACT or (code in KEYED and info.key == "!"):
                    continue
                rows = letters.get((uid, code), [])
                if not rows:
                    continue        # a recorded duplicate, or reported as ack-before-commit
                bad = [e for _, e in rows if not describes(beh, e)]
                if bad:
                    self.flag("contract-error-text", f"#{uid} {info.spec!r}: the handler of route {code} did "
                              f"'{beh}' but its dead letter says {bad[0][:300]!r}")

    # ---- violations ------------------------------------------------------------------------------
    def flag(self, kind: str, detail: str) -> None:
        assert kind in INVARIANTS, kind
        if kind not in self.kinds_here:
            self.kinds_here.add(kind)
            self.seen[kind] += 1
        if kind in self.suppressed:
            # A kind already reported: stop this example here (cheaply) and search on elsewhere.
            self.tainted = True
        self.pending.append((kind, detail))

    def raise_pending(self) -> None:
        pending, self.pending = self.pending, []
        for kind, detail in pending:
            if kind not in self.suppressed:
                self.failed = True
                if self.first_failure_at is None:
                    self.first_failure_at = self.cases
                raise violation_class(kind)(f"[{kind}] {INVARIANTS[kind]}\n    {detail}")

    def drain(self) -> None:
        """The database is back and the broker delivers everything: nothing may stay un-acked."""
        for _ in range(30):
            if not self.queue:
                if not self.unacked:
                    return
                self.restart()          # delivered, not acked: they come back on a new connection
                continue
            chunk, self.queue = self.queue[:16], self.queue[16:]
            self.run_batch(chunk, None)
            self.raise_pending()
            if self.tainted:
                return
        left = [f"#{u} {self.msgs[u].spec!r}" for u in self.unacked]
        self.flag("unacked-at-end", f"still un-acked after 30 batches without faults: {left[:5]}")


_RAW_DB_TEXT = re.compile(r"(?i)connection already closed|the connection is closed|cannot operate on a closed "
                          r"database|server closed the connection|no such savepoint|savepoint \S+ does not exist|"
                          r"cannot commit - no transaction is active|there is no transaction in progress")


def describes(beh: str, error: str) -> bool:
    """Does a dead letter's error say what the handler did (not just the driver error it led to)?"""
    text = _RAW_DB_TEXT.sub(" ", error)
    if beh == "swallow":
        return bool(re.search(r"(?i)swallow|caught|marked .{0,40}roll ?back|needs_rollback|rolled back", text)
                    and re.search(r"(?i)atomic", text))
    if beh == "close":
        return bool(re.search(r"(?i)clos", text))
    if beh == "commit":
        return bool(re.search(r"(?i)commit|roll ?back|ended the transaction|end(s|ed)? .{0,20}transaction", text))
    return True


# ---------------------------------------------------------------------------------------------
# The state machine

H: Harness | None = None


class MessagePath(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert H is not None
        H.new_example()

    @rule(new=st.deferred(lambda: st.lists(spec_strategy(H.behaviours), max_size=6)),  # type: ignore[union-attr]
          take=st.integers(1, 10), fault=faults)
    def deliver(self, new: list[Spec], take: int, fault: Fault | None) -> None:
        """The broker delivers: `new` are published, then the next `take` queued messages arrive
        as one batch, processed with `fault` injected."""
        h = H
        if h.tainted:
            return
        for spec in new:
            h.publish(spec)
        uids, h.queue = h.queue[:take], h.queue[take:]
        h.steps += 1
        h.run_batch(uids, fault)

    @rule(stale=st.integers(0, 3))
    def reconnect(self, stale: int) -> None:
        """The broker connection drops; `stale` messages that arrived on it just before are still
        processed (their acks go to a dead connection); everything un-acked comes back."""
        h = H
        if h.tainted:
            return
        uids = h.queue[:stale]
        h.steps += 1
        if uids:
            batch = [h.arrive(u) for u in uids]
            h.gen += 1                 # the connection they arrived on is gone
            h.next_mid = 0
            h.process(batch, None)
            h.queue = list(h.unacked)
        else:
            h._reconnect()

    @rule()
    def restart(self) -> None:
        """The process is restarted between batches (SIGKILL, or Supervisor)."""
        if H.tainted:
            return
        H.steps += 1
        H.restart()

    @invariant()
    def committed_state_is_consistent(self) -> None:
        H.raise_pending()
        H.check_state()
        H.raise_pending()

    def teardown(self) -> None:
        h = H
        if h.failed or h.tainted:
            return
        h.drain()
        h.raise_pending()
        h.check_state()
        h.raise_pending()


def run(harness: Harness, examples: int, seed: int | None, steps: int, report) -> list[dict]:
    """Run the model until `examples` test cases ran. Each new kind of violation is shrunk to a
    minimal example, reported, then suppressed so that the search goes on for the others."""
    from hypothesis import HealthCheck, Phase, Verbosity, settings
    from hypothesis import seed as hseed
    from hypothesis.reporting import with_reporter
    from hypothesis.stateful import get_state_machine_test

    global H
    H = harness
    found: list[dict] = []
    round_no = 0
    while harness.examples < examples:
        round_no += 1
        budget = examples - harness.examples
        harness.first_failure_at = None
        start = harness.cases
        s = settings(max_examples=budget, stateful_step_count=steps, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                     verbosity=Verbosity.normal, phases=[Phase.generate, Phase.shrink], print_blob=False)
        test = get_state_machine_test(MessagePath, settings=s)
        if seed is not None:
            test = hseed(seed + round_no - 1)(test)
        lines: list[str] = []
        try:
            with with_reporter(lines.append):
                test()
            harness.examples += harness.cases - start
            break
        except Violation as exc:
            # the cases up to the first failure searched; the rest shrank it
            harness.examples += (harness.first_failure_at or harness.cases) - start
            kind = type(exc).kind
            notes = [n for n in getattr(exc, "__notes__", []) if n.strip()]
            example = "\n".join(lines + [n for n in notes if n not in lines])
            found.append({"kind": kind, "message": str(exc), "example": example,
                          "examples_at": harness.examples, "cases_at": harness.cases})
            harness.suppressed.add(kind)
            report(found[-1])
    return found
