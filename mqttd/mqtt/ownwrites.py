"""The publisher's own writes: QoS 1 messages encoded by mqttd, not by paho's ``publish()``.

QoS 1 messages do not go through ``client.publish`` when this paho has the internals we expect
(``OWN_WRITES``; else plain paho, slower and the same on the wire): ``pubwire`` encodes the
messages the window has room for into one buffer, queued on paho's connection as one packet, and
their PUBACKs come to ``_take_puback`` (``outfast.own_pubacks``) without paho's bookkeeping. The
network thread moves the next messages once per burst of PUBACKs read (``outfast.fast_reads``),
so one ``send()`` carries as many messages as PUBACKs came in. paho knows nothing of them, so a
reconnect resends them from here (``_resend_own``): first, in their order, with the DUP flag and
their stamp as they were, as paho resends its own.

A mixin of ``outbound.Outbound``, which owns the state declared here and its locks (see there).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from mqttd.mqtt import pubwire
from mqttd.mqtt.confirm import Confirm

if TYPE_CHECKING:
    import paho.mqtt.client as paho

# What the own-writes path uses of paho (present in 2.1.0 and 2.2.0); if one is missing: plain paho.
OWN_WRITES = ("_packet_queue", "_mid_generate", "_out_packet", "_sockpairW")


class OwnWrites:
    """``_write_own`` (pump lock held), ``_take_puback`` (network thread), ``_resend_own`` (on connect)."""

    client: paho.Client
    v5: bool
    pub_id: str
    own_writes: bool
    settled_count: int
    _seq: int
    _in_flight: int
    _lock: threading.Lock
    _backlog: deque[Confirm]
    _pending: dict[int, Confirm]

    def _write_own(self, batch: list[Confirm]) -> None:
        """QoS 1 messages as one buffer on paho's connection (``pubwire``); the pump lock is held.
        Each is registered under its packet id before its bytes can reach the broker."""
        client, v5, pub_id = self.client, self.v5, self.pub_id
        new_mid = client._mid_generate             # paho's counter: QoS 0/2 through paho never collide
        parts: list[bytes] = []
        mids: list[int] = []
        for confirm in batch:
            props = None
            if v5:
                if confirm.seq is None:            # a resend keeps its stamp
                    self._seq += 1
                    confirm.seq = self._seq
                props = pubwire.stamp_properties(pub_id, confirm.seq)
            mid = new_mid()
            parts += pubwire.publish_qos1(confirm.topic, confirm.payload, mid, retain=confirm.retain,
                                          dup=confirm.mid is not None, properties=props)
            mids.append(mid)
        with self._lock:
            pending = self._pending
            for confirm, mid in zip(batch, mids):
                confirm.mid = mid
                pending[mid] = confirm
        # One queued "packet" for paho's writer: it only counts bytes (qos 1: no on_publish when
        # written). Lost with the connection (paho empties its queue on reconnect): resent by
        # _on_connect from _pending.
        client._packet_queue(pubwire.PUBLISH | 2, b"".join(parts), 0, 1, None)

    def _take_puback(self, mid: int, reason: int) -> bool:
        """A PUBACK (network thread): True if it confirms a message of ``_write_own``. The next
        messages move in ``_after_reads``, once per burst of PUBACKs."""
        if not self.own_writes:
            return False
        with self._lock:
            confirm = self._pending.get(mid)
            if confirm is None or confirm.qos != 1:
                return False
            del self._pending[mid]
            self._in_flight -= 1
            self.settled_count += 1
            confirm._finish(None if reason < 0x80 else
                            f"the broker refused it: {ReasonCode(PacketTypes.PUBACK, identifier=reason)}")
        return True

    def _resend_own(self) -> None:
        """After a reconnect: ours that were in flight go first again, in their order (paho
        resends its own itself); ``_write_own`` sets DUP on them and keeps their stamp."""
        with self._lock:
            again = [c for c in self._pending.values() if c.qos == 1]
            for confirm in again:
                del self._pending[confirm.mid]  # type: ignore[arg-type]
            self._in_flight -= len(again)
            self._backlog.extendleft(reversed(again))
