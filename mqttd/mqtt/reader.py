"""The network thread's wait and read: select() on the socket and the outbox's waker, with flow
control (no reading while the intake is past max_backlog).

An idle daemon costs next to nothing: the thread sleeps in select() until the broker sends
something, another thread queues an ack or a publish (``outbox.Waker``), or ``LOOP_BEAT_S``
passes. It used to wake every 10 ms so that queued acks went out soon (1.5% of a core per idle
daemon, measured; docs/reliability.md has the figures). The beat remains for the watchdog's
loop-stall check, paho's keepalive (``loop_misc``) and the session's own timers.

The socket is read 64 KiB at a time and PUBLISH packets are decoded from that buffer
(``pahofast.RecvBuffer``); packets already buffered do not wake select(), so they are taken
here, a bounded number at a time so that queued acks go out in between.
"""
from __future__ import annotations

import select
import time
from collections.abc import Callable, Sized

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from mqttd.mqtt import pahofast
from mqttd.mqtt.outbox import Waker

LOOP_BEAT_S = 1.0       # the longest sleep: the loop beats (state.loop_beat) at least this often
DRAIN_PACKETS = 256     # packets handled from the receive buffer before acks go out again
OK = MQTTErrorCode.MQTT_ERR_SUCCESS


class Reader:
    """Drives one paho client (``attach`` a new one after a rebuild) for the network thread."""

    def __init__(self, waker: Waker, intake: Sized, max_backlog: int, on_publish: pahofast.PublishHandler,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.waker, self.intake, self.max_backlog, self.on_publish = waker, intake, max_backlog, on_publish
        self.clock = clock
        self.keepalive = 60.0          # the connection's (the session sets the granted one)
        self.paused = False            # not reading: the intake is full or the daemon is stopping
        self.paused_since = 0.0
        self.client: paho.Client | None = None
        self.rbuf: pahofast.RecvBuffer | None = None
        self.v5 = True

    def attach(self, client: paho.Client, rbuf: pahofast.RecvBuffer, v5: bool) -> None:
        self.client, self.rbuf, self.v5 = client, rbuf, v5

    def step(self, stop_reading: bool) -> MQTTErrorCode:
        """One loop iteration; stops reading while the intake is full or while stopping."""
        c = self.client
        assert c is not None
        if stop_reading or len(self.intake) >= self.max_backlog:
            now = self.clock()
            if not self.paused:
                self.paused, self.paused_since = True, now
            # Never pause past a quarter of the keepalive: PINGRESPs must still be read. Until
            # then wait for a poke (an ack: the dispatcher took a batch) or a timer, not the socket.
            due = self.paused_since + self.keepalive / 4
            if now < due:
                self.wait(min(LOOP_BEAT_S, due - now), reading=False)
                rc = c.loop_write()
                if rc == OK:
                    rc = c.loop_misc()
                return rc
            self.paused_since = now
            return self.loop_once(at_least_one=True)
        self.paused = False
        return self.loop_once()

    def loop_once(self, at_least_one: bool = False, timeout: float = LOOP_BEAT_S) -> MQTTErrorCode:
        """One wait-and-read, then the packets already in the receive buffer (they do not wake
        select()), a bounded number at a time so that queued acks go out in between.

        ``at_least_one``: the read a paused session makes every keepalive/4 handles a buffered
        packet even though the intake is full. When everything the broker sent is already
        buffered, the socket is not readable and it would otherwise read nothing; paho, seeing
        no bytes after its PINGREQ, would then drop the connection ("Keep alive timeout")."""
        rbuf = self.rbuf
        assert rbuf is not None
        pending = rbuf.pending()
        rc = self.io(0.0 if pending else timeout)
        n = 0
        if at_least_one and pending and rc == OK:
            rc = self._read_buffered()
            n = 1
        while rc == OK and n < DRAIN_PACKETS and rbuf.pending() and len(self.intake) < self.max_backlog:
            rc = self._read_buffered()
            n += 1
        return rc

    def io(self, timeout: float) -> MQTTErrorCode:
        """paho's ``loop(timeout)`` with our waker in place of its socketpair: wait until the
        socket is readable (or writable with output pending), a poke, or ``timeout``; then
        read, write and paho's timers (``loop_misc``: keepalive)."""
        c = self.client
        assert c is not None
        sock = c.socket()
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        ready = self.wait(timeout, reading=True)
        if ready is None:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST      # what paho's loop says of a broken socket
        readable, writable = ready
        if readable:
            rc = c.loop_read()
            if rc or c.socket() is None:
                return rc
        if writable:
            rc = c.loop_write()
            if rc or c.socket() is None:
                return rc
        return c.loop_misc()

    def wait(self, timeout: float, reading: bool) -> tuple[bool, bool] | None:
        """select() on the waker, the socket (for reading only if ``reading``; for writing when
        paho has output pending). Returns (socket readable, write now), None if select() fails."""
        c = self.client
        assert c is not None
        sock = c.socket()
        rlist: list = [self.waker]
        wlist: list = []
        pending_tls = 0
        if sock is not None:
            if reading:
                rlist.append(sock)
                pending_tls = sock.pending() if hasattr(sock, "pending") else 0   # bytes TLS already decrypted
            if c.want_write():
                wlist.append(sock)
        try:
            r, w, _ = select.select(rlist, wlist, [], 0.0 if pending_tls else timeout)
        except (TypeError, ValueError, OSError):
            return None
        poked = self.waker in r
        if poked:
            self.waker.clear()
        # A poke also writes: output queued by another thread goes out now (as paho's loop does).
        return (sock is not None and (sock in r or pending_tls > 0)), (sock is not None and (sock in w or poked))

    def _read_buffered(self) -> MQTTErrorCode:
        """One packet from the receive buffer: a whole PUBLISH decoded by the buffer itself,
        anything else by paho."""
        assert self.rbuf is not None and self.client is not None
        packet = self.rbuf.take_publish(self.v5)
        if packet is None:
            return self.client.loop_read()
        self.on_publish(*packet)
        return OK
