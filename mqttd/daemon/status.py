"""The status file (RUN_DIR/NAME.status.json) and the health verdict read from it (docs/operations.md, 'Health').
Its contents are typed in ``mqttd.daemon.schema``.

The daemon rewrites the file atomically (temp file + rename) every ``status.interval`` seconds;
``status``, ``health`` and ``recover`` read it, and judge liveness by probing the flock, never by
trusting the PID text.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqttd.daemon import lock
from mqttd.daemon.schema import Row, Status
from mqttd.identity import Identity

STALE_AFTER_S = 15.0
DISCONNECT_GRACE_S = 30.0
CANARY_MAX_AGE_S = 60.0


def _limit(env_name: str, default: float) -> float:
    """A threshold from ``env_name`` (positive seconds), else ``default``. Read at each verdict so
    a monitor (or a test) can tighten it; an unusable value keeps the default, because a typo in a
    monitor's environment must neither flag every instance nor break ``/healthz``."""
    try:
        value = float(os.environ.get(env_name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def write_atomic(path: Path, status: Status) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    # One compact line: json's C encoder (an indent makes it fall back to the pure-Python one,
    # most of an idle daemon's CPU when written every few seconds). `mqttd status` is the human view.
    text = json.dumps(status.to_json(), sort_keys=True)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read(path: Path) -> Status | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Status.from_json(data) if isinstance(data, dict) else None


class RateMeter:
    """Messages per second over the last minute, from periodic samples of a counter."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def sample(self, now: float, count: int) -> float:
        self.samples.append((now, count))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        t0, c0 = self.samples[0]
        return (count - c0) / (now - t0) if now > t0 else 0.0


@dataclass
class Verdict:
    healthy: bool
    reason: str


def verdict(status: Status | Mapping[str, Any] | None, held: bool, now: float | None = None) -> Verdict:
    """Healthy = lock held, status fresh, connected (or within 30 s), DB ok, canary within 60 s.

    ``MQTTD_STATUS_MAX_AGE`` and ``MQTTD_CANARY_MAX_AGE`` (seconds) override the 15 s and 60 s
    limits for the process that judges (status, health, recover, a monitor); unset, the documented 15 s and 60 s hold.
    """
    now = time.time() if now is None else now
    stale_after = _limit("MQTTD_STATUS_MAX_AGE", STALE_AFTER_S)
    canary_max_age = _limit("MQTTD_CANARY_MAX_AGE", CANARY_MAX_AGE_S)
    if not held:
        return Verdict(False, "not running (lock not held)")
    if status is None:
        return Verdict(False, "no status file")
    if not isinstance(status, Status):
        status = Status.from_json(status)
    age = now - float(status.updated_at or 0)
    if age > stale_after:
        return Verdict(False, f"status file is stale ({age:.0f}s old): process hung?")
    if status.state != "running":
        return Verdict(False, f"state is {status.state}")
    if not status.connected:
        last = status.last_connected_at
        since = now - float(last) if last else None
        if since is None or since > DISCONNECT_GRACE_S:
            why = status.last_error or "not connected"
            return Verdict(False, f"broker disconnected ({why})")
    if status.subscribe_failures:
        return Verdict(False, f"broker refused subscriptions: {'; '.join(status.subscribe_failures)}")
    if status.db_ok is False:
        return Verdict(False, f"database unavailable: {status.db_error}")
    started = float(status.started_at or now)
    canary_at = status.canary_at
    reference = float(canary_at) if canary_at else started
    if now - reference > canary_max_age:
        what = f"last canary round trip {now - float(canary_at):.0f}s ago" if canary_at else "no canary round trip yet"
        return Verdict(False, f"{what} (subscriptions lost or pipeline stuck)")
    return Verdict(True, "ok")


def row(identity: Identity, now: float | None = None) -> Row:
    """One `status --json` object for an instance, combining the file and a lock probe."""
    now = time.time() if now is None else now
    held = lock.is_held(identity.lock_path)
    found = read(identity.status_path)
    v = verdict(found, held, now)
    st = found or Status()
    pid = st.pid if held else None
    if held and pid is None:
        pid = lock.holder_pid(identity.lock_path)

    def age(value: float | None) -> float | None:
        return round(now - float(value), 1) if value else None

    return Row(
        project=identity.project, instance=identity.instance, name=identity.name, pid=pid,
        state=st.state if held else "stopped", healthy=v.healthy, reason=v.reason,
        client_id=st.client_id or identity.client_id, connected=st.connected if held else False,
        uptime_s=age(st.started_at) if held else None, last_message_age_s=age(st.last_message_at),
        rate_1m=st.rate_1m, backlog=st.backlog,
        received=st.received, handled=st.handled, dead_letters=st.dead_letters,
        duplicates_skipped=st.duplicates_skipped, unrouted=st.unrouted, canary=st.canary, in_flight=st.in_flight,
        reconnects=st.reconnects, session_gaps=st.session_gaps, publisher_gaps=st.publisher_gaps,
        canary_age_s=age(st.canary_at),
        canary_rtt_ms=st.canary_rtt_ms, db_ok=st.db_ok, status_age_s=age(st.updated_at),
    )


def instances_in(run_dir: Path) -> list[tuple[str, int | None]]:
    """(project, instance) pairs that have a lock or status file in ``run_dir``."""
    found: set[str] = set()
    try:
        for entry in run_dir.iterdir():
            if entry.name.endswith(".status.json"):
                found.add(entry.name[: -len(".status.json")])
            elif entry.name.endswith(".pid"):
                found.add(entry.name[:-4])
    except OSError:
        return []
    out: list[tuple[str, int | None]] = []
    for name in sorted(found):
        st = read(run_dir / f"{name}.status.json")
        out.append((st.project, st.instance) if st is not None and st.project else (name, None))
    return out
