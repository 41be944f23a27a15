"""What the session shares with the rest of the daemon: its state (read by the status writer and
the watchdog) and the shape of the intake it writes into."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mqttd.message import Message


class Inbox(Protocol):
    """Where the session puts every message it receives (``mqttd.ingest.intake.Intake``):
    ``put`` must never block; ``len`` is read to stop reading the socket past max_backlog."""

    def put(self, msg: Message) -> None: ...

    def __len__(self) -> int: ...


@dataclass
class SessionState:
    """What the status file and the watchdog read. Written by the network thread only."""

    connected: bool = False
    generation: int = 0
    connects: int = 0
    reconnects: int = 0
    session_gaps: int = 0
    last_connected_at: float | None = None      # wall clock
    last_disconnected_at: float | None = None
    last_error: str | None = None
    loop_beat: float = 0.0                      # monotonic time of the last loop iteration (>= 1/s)
    subscribe_failures: tuple[str, ...] = ()
    paused_reading: bool = False
    # monotonic time a connect() on the network thread began, None when not in one: DNS and the
    # TCP/TLS handshake block the thread (paho's connect_timeout does not bound getaddrinfo), so
    # the watchdog allows a connect longer than a loop iteration before calling it a stall
    connecting_since: float | None = None
    protocol: str | None = None                 # spoken on the current (last) connection: "5" or "3.1.1"
    connect_failures: int = 0                   # attempts in a row without a connection that stayed up
    granted: dict | None = None                 # the last CONNACK's grants (grants.Grants.as_dict())
    broker: str | None = None                   # "host:port" of the node connected to (or tried last)
