"""The status contract, typed and in one place (docs/operations.md: status, health, accounting).

``Status`` is what the daemon writes to ``RUN_DIR/NAME.status.json`` every ``status.interval``
and what ``/metrics`` reads at scrape time; ``status``, ``health`` and ``recover`` read it back
from the file with ``Status.from_json``. ``Row`` is one object of ``mqttd status --json``. The
JSON key of a field is its name: the file format and the ``--json`` keys are the external
contract, so a field is added, never renamed.

``snapshot`` builds a ``Status`` from the running daemon's parts; nothing else assembles one.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypedDict

from mqttd import __version__

if TYPE_CHECKING:
    from mqttd.daemon.run import Daemon


@dataclass
class Status:
    """One status snapshot of an instance. Defaults are what a reader assumes for a key an older
    writer did not write."""

    # who
    project: str = ""
    instance: int | None = None
    name: str = ""
    pid: int | None = None
    version: str = ""
    client_id: str = ""
    state: str = "unknown"              # starting, running, stopping, stopped, failed
    started_at: float | None = None     # wall clock
    updated_at: float | None = None
    error: str | None = None            # why it failed (state "failed")
    # the broker connection (mqttd.mqtt.session.SessionState)
    connected: bool = False
    last_connected_at: float | None = None
    last_disconnected_at: float | None = None
    last_error: str | None = None
    reconnects: int = 0
    session_gaps: int = 0
    generation: int = 0
    subscribe_failures: list[str] = field(default_factory=list)
    paused_reading: bool = False
    protocol: str | None = None
    broker: str | None = None           # "host:port" of the node connected to (or tried last)
    connect_failures: int = 0
    granted: dict[str, Any] | None = None
    subscriptions: list[str] = field(default_factory=list)
    metrics_port: int | None = None
    # the message path
    backlog: int = 0                    # in the intake plus the batch in hand
    rate_1m: float = 0.0                # tenant messages settled per second, last minute
    ack_latency_ms_p50: float | None = None
    ack_latency_ms_p99: float | None = None
    ack_latency: dict[str, Any] | None = None      # metrics.LatencyWindow.histogram()
    # the accounting (mqttd.ingest.stats): received = the five outcomes + in_flight
    received: int = 0
    handled: int = 0
    dead_letters: int = 0
    duplicates_skipped: int = 0
    unrouted: int = 0
    canary: int = 0
    in_flight: int = 0
    acked: int = 0
    batches: int = 0
    last_batch_size: int = 0
    last_message_at: float | None = None
    db_ok: bool | None = None
    db_error: str | None = None
    last_db_ok_at: float | None = None
    db_retries: int = 0
    canary_sent_at: float | None = None
    canary_at: float | None = None
    canary_rtt_ms: float | None = None
    deadletter_error: str | None = None
    # gap detection (mqttd.ingest.gaps): the project's missing sequence numbers, from the tenant
    # database (the same in every instance); None and the reason in gap_detection when it is off
    publisher_gaps: int | None = None
    gap_detection: str | None = None    # "on", or "off: why"
    # keys this version does not know (written by a newer part, e.g. publisher_gaps): kept as they are
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # A shallow copy (the values are JSON already): asdict's deep copy was most of the cost of
        # a status write, which an idle daemon does every few seconds.
        data = {name: getattr(self, name) for name in _NAMES}
        return {**self.extra, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Status:
        """From a status file (or a snapshot dict): unknown keys go to ``extra``; a value of the
        wrong JSON type falls back to the default rather than break a monitor."""
        known = _FIELDS
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known or key == "extra":
                extra[key] = value
            elif value is None or isinstance(value, known[key]):
                kwargs[key] = value
        return cls(**kwargs, extra=extra)

    def get(self, key: str, default: Any = None) -> Any:
        """A field or an extra key by its JSON name (for the optional metrics)."""
        if key in _FIELDS:
            return getattr(self, key)
        return self.extra.get(key, default)


def _json_types(annotation: str) -> tuple[type, ...]:
    """The JSON value types a field accepts, from its annotation (``int | None`` -> int, float)."""
    by_name: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                            "list": (list,), "dict": (dict,)}
    kinds: tuple[type, ...] = ()
    for part in annotation.replace(" ", "").split("|"):
        kinds += by_name.get(part.split("[", 1)[0], ())
    return kinds or (object,)


_FIELDS: dict[str, tuple[type, ...]] = {f.name: _json_types(str(f.type)) for f in fields(Status)}
_NAMES = tuple(name for name in _FIELDS if name != "extra")


class Row(TypedDict):
    """One object of ``mqttd status --json`` (docs/operations.md lists the keys every version keeps)."""

    project: str
    instance: int | None
    name: str
    pid: int | None
    state: str
    healthy: bool
    reason: str
    client_id: str
    connected: bool
    uptime_s: float | None
    last_message_age_s: float | None
    rate_1m: float
    backlog: int
    received: int
    handled: int
    dead_letters: int
    duplicates_skipped: int
    unrouted: int
    canary: int
    in_flight: int
    reconnects: int
    session_gaps: int
    publisher_gaps: int | None
    canary_age_s: float | None
    canary_rtt_ms: float | None
    db_ok: bool | None
    status_age_s: float | None


def percentiles(seconds: Iterable[float]) -> tuple[float | None, float | None]:
    """p50 and p99 in milliseconds of a window of latencies (None when empty)."""
    values = sorted(seconds)
    if not values:
        return None, None

    def pick(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    return pick(0.5), pick(0.99)


def snapshot(d: Daemon) -> Status:
    """The running daemon's status now. The counters come from ``Stats.accounts``, which reads
    ``received`` with the settled counters held still, so the identity holds in every snapshot."""
    ss, session = d.session.state, d.session
    p50, p99 = percentiles(session.ack_latencies)
    accounts = d.stats.accounts(lambda: session.received)
    extra = {k: accounts.pop(k) for k in list(accounts) if k not in _FIELDS}     # a counter added to Stats
    return Status(
        project=d.identity.project, instance=d.identity.instance, name=d.identity.name, pid=os.getpid(),
        version=__version__, client_id=d.client_id, state=d.state, started_at=d.started_at, updated_at=time.time(),
        connected=ss.connected, last_connected_at=ss.last_connected_at, last_disconnected_at=ss.last_disconnected_at,
        last_error=ss.last_error, reconnects=ss.reconnects, session_gaps=ss.session_gaps, generation=ss.generation,
        subscribe_failures=list(ss.subscribe_failures), paused_reading=ss.paused_reading, protocol=ss.protocol,
        broker=getattr(ss, "broker", None), connect_failures=ss.connect_failures, granted=ss.granted,
        subscriptions=[s for s, _ in session.subscriptions],
        metrics_port=d.metrics.port if d.metrics is not None else None,
        backlog=len(d.intake) + d.dispatcher.in_hand, rate_1m=d.last_rate,
        ack_latency_ms_p50=p50, ack_latency_ms_p99=p99, ack_latency=session.ack_latencies.histogram(),
        publisher_gaps=d.gaps.value if d.gaps is not None else None, gap_detection=d.gap_detection,
        **accounts, extra=extra,
    )
