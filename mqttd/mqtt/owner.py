"""Takeover evidence: the retained owner record ``host:pid:start`` on ``mqttd/NAME/owner/CLIENTID``.

Mosquitto 2.0.11 sends no "session taken over" reason code, so a connection that keeps dying
within seconds of its CONNACK is the only sign of a twin, and a flapping broker looks the same.
The owner record tells them apart: each process publishes its own on every connect, and a record
of *another live* process using the same client id is the proof that turns short-lived
connections into exit 73.

Anyone may publish on that topic, and a retained record comes back on every start: a payload
that is not a record (``parse`` says None) is no evidence of anything, and nothing here raises.
"""
from __future__ import annotations

import logging
import math
import os
import re
import socket
import time

log = logging.getLogger("mqttd.session")

MAX_RECORD = 512            # bytes: a host name is at most 255, a pid and a time a few dozen
MAX_PID = 2**22             # Linux's pid_max ceiling (4194304)
_RECORD = re.compile(r"([^:\s]{1,255}):([0-9]{1,10}):([0-9]{1,15}(?:\.[0-9]{1,9})?)")


def own_record() -> str:
    """This process's owner record."""
    return f"{socket.gethostname()}:{os.getpid()}:{time.time():.3f}"


def parse(raw: bytes | str) -> str | None:
    """The owner record in a payload, or None if the payload is not one: ``host:pid:start`` with
    a pid from 1 to pid_max and a finite start time (no "inf", "nan", 400-digit pids, pid 0 or
    negative ones, control characters or non-UTF-8 bytes, nothing over ``MAX_RECORD`` bytes)."""
    if len(raw) > MAX_RECORD:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    m = _RECORD.fullmatch(raw)
    if m is None or not 0 < int(m.group(2)) <= MAX_PID or not math.isfinite(float(m.group(3))):
        return None
    return raw


def started_at(record: str) -> float:
    """The start time in an owner record (``host:pid:start``); 0 when it has none."""
    try:
        value = float(record.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def is_live_other(record: str) -> bool:
    """Is this owner record (``host:pid:start``) another live process, i.e. twin evidence?

    A record from another host always is. One from this host is only if its pid is alive: after
    a SIGKILL the broker still holds the dead predecessor's record, which is not a twin (counting
    it made a restarted daemon exit 73 when the broker then flapped). A record that ``parse``
    refuses is never evidence (pid 0 would signal our own process group and look alive; a huge
    pid makes ``os.kill`` raise OverflowError)."""
    if parse(record) is None:
        return False
    host, _, rest = record.partition(":")
    if host != socket.gethostname():
        return True
    pid = int(rest.partition(":")[0])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, under another user
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


class TakeoverWatch:
    """The session's side of takeover detection: its own record (published retained on every
    connect), the records others publish there, and the count of connections that died within
    seconds of their CONNACK."""

    def __init__(self, topic: str | None, client_id: str, rounds: int) -> None:
        self.topic, self.client_id, self.rounds = topic, client_id, rounds
        self.topic_b = topic.encode() if topic else None
        self.payload = own_record()
        self._started_at = started_at(self.payload)
        self._twin_is_older = False
        self._bad_record: bytes | None = None
        self._short_lived = 0
        self.twin: str | None = None

    def record(self, raw: bytes) -> None:
        """A retained record on the owner topic. Anyone can publish there, and the broker hands
        a retained one back on every start, so nothing in it may end the network thread (that
        would be a crash loop): a record that is not ``host:pid:start`` is a warning, once."""
        try:
            rec = parse(raw)
            if rec is None:
                if raw and raw != self._bad_record:
                    self._bad_record = raw
                    log.warning("ignoring a malformed record on %s (%d bytes, not host:pid:start): %r",
                                self.topic, len(raw), raw[:80])
                return
            if rec == self.payload or rec == self.twin or not is_live_other(rec):
                return
            self.twin = rec
            self._twin_is_older = started_at(rec) < self._started_at
            log.error("another process uses this name and client id %r: %s (host:pid:start)", self.client_id, rec)
        except Exception as exc:  # noqa: BLE001 - never let a published record end the network thread
            log.warning("ignoring a record on %s that could not be read: %r", self.topic, exc)

    def disconnected(self, lived: float) -> str | None:
        """A connection ended after ``lived`` seconds: the reason to stop, if this is a takeover.

        Mosquitto 2.0.11 sends no "session taken over" code, so a connection that keeps dying
        within seconds of CONNACK is the only sign of a twin. The newcomer yields: the copy that
        was there first waits twice as many rounds, so the fight ends with the misconfigured copy
        just started stopping, not the one in service."""
        self._short_lived = self._short_lived + 1 if lived < 5 else 0
        rounds = self.rounds * (1 if self._twin_is_older else 2)
        if self.rounds and self.twin and self._short_lived >= rounds:
            return (f"client id {self.client_id!r} was disconnected {self._short_lived} times within seconds of "
                    f"connecting: another client is using the same client id ({self.twin}); "
                    "stopping instead of fighting")
        return None
