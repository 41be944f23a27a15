"""``Confirm``: the receipt of one message the tenant's publisher sent (no paho in here)."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from mqttd.errors import PublishError

if TYPE_CHECKING:
    from mqttd.mqtt.pipeline import Pipeline


class Confirm:
    """The receipt of one published message: ``done``, ``confirmed``, ``wait(timeout)``.

    ``mid`` is the MQTT packet id once the message went to the broker (None before); ``seq`` its
    ``mqttd-seq`` stamp (None on MQTT 3.1.1 and for QoS 0); ``index`` its place in a
    ``publish_many`` call.

    The ``threading.Event`` to wait on is made only when someone waits for a message not done
    yet: one per message cost more than the rest of a pipelined publish (measured). Both that
    and ``_finish`` happen under the connection's short lock, so no wake-up is lost.
    """

    __slots__ = ("topic", "payload", "qos", "retain", "index", "mid", "seq", "_done", "_event", "_error", "_conn")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool, index: int = 0) -> None:
        self.topic, self.payload, self.qos, self.retain, self.index = topic, payload, qos, retain, index
        self.mid: int | None = None
        self.seq: int | None = None
        self._done = False
        self._event: threading.Event | None = None
        self._error: str | None = None
        self._conn: Pipeline | None = None

    @property
    def done(self) -> bool:
        """Confirmed, or failed for good (refused by the broker, withdrawn, publisher closed)."""
        return self._done

    @property
    def confirmed(self) -> bool:
        return self._done and self._error is None

    @property
    def sent(self) -> bool:
        """Handed to the connection (it may still arrive after a timeout); False: never left."""
        return self.mid is not None

    @property
    def error(self) -> str | None:
        return self._error

    def wait(self, timeout: float | None = None) -> None:
        """Return once the broker confirmed the message; raise PublishError if it refused it or
        no confirm came within ``timeout`` seconds (the message may still arrive later)."""
        if not self.settled(timeout):
            raise PublishError(f"publish to {self.topic!r} failed: {self.why_not(timeout)}")
        if self._error is not None:
            raise PublishError(f"publish to {self.topic!r} failed: {self._error}")

    def why_not(self, timeout: float | None) -> str:
        """Why this message is not confirmed yet, in words for an error message."""
        if self._error is not None:
            return self._error
        conn, within = self._conn, "" if timeout is None else f" within {timeout:g}s"
        where = conn.where if conn is not None else "the broker"
        up = conn is not None and conn.connected.is_set()
        why = "connection still up" if up else (conn.last_error if conn else None) or "no answer yet"
        if not self.sent:
            if up:
                return f"still queued behind other messages for {where}{within} ({why})"
            return f"not connected to {where}{within} ({why})"
        if self.qos == 0:
            return f"not written to the socket{within} ({why})"
        return f"no acknowledgement from {where}{within} ({why})"

    def settled(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the message to be done; True if it is."""
        if self._done:
            return True
        conn = self._conn
        if conn is None:
            return False            # never submitted: nothing will ever settle it
        with conn._lock:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def _finish(self, error: str | None) -> None:
        """Done for good; the caller holds the connection's lock (or it was never submitted)."""
        self._error = error
        self._done = True
        if self._event is not None:
            self._event.set()

    def __repr__(self) -> str:
        state = "confirmed" if self.confirmed else self._error or ("in flight" if self.sent else "queued")
        return f"<Confirm #{self.index} {self.topic!r} mid={self.mid} seq={self.seq}: {state}>"
