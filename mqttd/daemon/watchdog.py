"""The watchdog: notices what the process cannot recover from by itself and exits non-zero, so
that Supervisor restarts it (docs/delivery.md). Checked by the main loop every 100 ms:

- a dead network or dispatcher thread;
- a network loop that stopped iterating (a connect, with its DNS lookup, is allowed longer);
- a connection that moves no packets, not even PINGRESP;
- a handler call past ``dispatch.handler_timeout`` (``_handler_overdue``: a query waiting on a
  lock is cancelled and the batch retried; a handler hung in its own code is recorded in the
  poison list, then the process exits and the message is set aside on the next start).
"""
from __future__ import annotations

import logging
import time

from mqttd.config import Config
from mqttd.errors import MqttdError, WatchdogTripped
from mqttd.ingest.dispatch import Dispatcher
from mqttd.ingest.poison import PoisonList
from mqttd.message import Message
from mqttd.mqtt.session import Session
from mqttd.router import Route

log = logging.getLogger("mqttd.daemon")

LOOP_STALL_S = 30.0          # the network loop beats at least every second; 30 s without a beat is a hang
CONNECT_STALL_S = 300.0      # one connect (getaddrinfo included) may block the loop this long


class Watchdog:
    def __init__(self, config: Config, session: Session, dispatcher: Dispatcher, poison: PoisonList) -> None:
        self.config, self.session, self.dispatcher, self.poison = config, session, dispatcher, poison

    def check(self) -> None:
        """Raise ``WatchdogTripped`` (or the network thread's own fatal ``MqttdError``) if the
        process must exit; return otherwise."""
        s = self.session
        if s.fatal is not None:
            if isinstance(s.fatal, MqttdError):
                raise s.fatal
            raise WatchdogTripped(f"network thread died: {s.fatal!r}")
        if not s.thread.is_alive():
            raise WatchdogTripped("network thread ended")
        if not self.dispatcher.thread.is_alive():
            raise WatchdogTripped(f"dispatcher thread died: {self.dispatcher.fatal!r}")
        now = time.monotonic()
        current, limit_s = self.dispatcher.current, self.config.dispatch.handler_timeout
        if current is not None and now - current[2] > limit_s:
            self._handler_overdue(current, now, limit_s)
        # A connect (DNS, TCP, TLS) blocks the network thread and getaddrinfo has no timeout of
        # ours: a slow resolver is waited out for CONNECT_STALL_S, not called a hang at 30 s.
        connecting_since = s.state.connecting_since
        if connecting_since is not None and now - connecting_since <= CONNECT_STALL_S:
            pass
        elif now - s.state.loop_beat > LOOP_STALL_S:
            what = "connecting to the broker" if connecting_since is not None else "network loop"
            raise WatchdogTripped(f"{what} stalled for {now - s.state.loop_beat:.0f}s")
        last_in = s.last_bytes_received()
        limit = 2 * self.config.broker.keepalive + 10
        if s.state.connected and last_in is not None and now - last_in > limit:
            raise WatchdogTripped(f"connection moved no packets for {now - last_in:.0f}s (not even PINGRESP)")

    def _handler_overdue(self, current: tuple[list[Message], Route, float], now: float, limit_s: float) -> None:
        """A handler call has run past dispatch.handler_timeout.

        Waiting in a query (a lock held by another transaction, an overloaded server) is the
        database's doing, not the message's: the query is cancelled, the handler gets an
        OperationalError and the batch is retried as for an outage; nothing is poisoned. Hung in
        its own code (a thread cannot be killed): the call is recorded in the poison list and the
        process exits so that Supervisor restarts it; the message is then set aside as a dead letter."""
        msgs, route, since = current
        what = msgs[0].topic if len(msgs) == 1 else f"a batch of {len(msgs)} messages"
        queries = self.dispatcher.queries
        if queries.cancelled_call == since:
            # Cancelled once already: give the handler the timeout again to give up. One that goes
            # on waiting (say, retrying its query in a loop) is hung for all practical purposes.
            if now - (queries.cancelled_at or now) < limit_s:
                return
        else:
            waiting = queries.waiting_since()
            if waiting is not None and now - waiting >= min(1.0, limit_s / 2):
                if queries.cancel(since):
                    log.warning("handler %s on %s has waited %.1fs in a database query (a lock held elsewhere?): "
                                "cancelled the query; the batch is retried as for a database outage",
                                route.name, what, now - waiting)
                    return
            elif waiting is not None and now - since < 2 * limit_s:
                return          # a query that has only just started: see whether it waits
        try:
            self.poison.record_hang(msgs, route.name, limit_s)
        except OSError as exc:
            log.error("cannot record the hung message in %s: %s", self.poison.path, exc)
        after_cancel = " (it went on waiting after its query was cancelled)" if queries.cancelled_call == since else ""
        raise WatchdogTripped(f"handler {route.name} hung on {what} for more than {limit_s:g}s "
                              f"(dispatch.handler_timeout){after_cancel}: exiting so that the process is restarted; "
                              "the message is set aside as a dead letter instead of running again")
