"""Takeover evidence: the retained owner record ``host:pid:start`` on ``mqttd/NAME/owner/CLIENTID``.

Mosquitto 2.0.11 sends no "session taken over" reason code, so a connection that keeps dying
within seconds of its CONNACK is the only sign of a twin, and a flapping broker looks the same.
The owner record tells them apart: each process publishes its own on every connect, and a record
of *another live* process using the same client id is the proof that turns short-lived
connections into exit 73.
"""
from __future__ import annotations

import os
import socket
import time


def own_record() -> str:
    """This process's owner record."""
    return f"{socket.gethostname()}:{os.getpid()}:{time.time():.3f}"


def started_at(record: str) -> float:
    """The start time in an owner record (``host:pid:start``); 0 when it has none."""
    try:
        return float(record.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0.0


def is_live_other(record: str) -> bool:
    """Is this owner record (``host:pid:start``) another live process, i.e. twin evidence?

    A record from another host always is. One from this host is only if its pid is alive: after
    a SIGKILL the broker still holds the dead predecessor's record, which is not a twin (counting
    it made a restarted daemon exit 73 when the broker then flapped)."""
    host, _, rest = record.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, under another user
        return True
    return True
