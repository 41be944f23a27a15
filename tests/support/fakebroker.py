"""A tiny scripted MQTT "broker" for one test: it answers CONNECT with a crafted CONNACK (or closes
before any), SUBSCRIBE with a SUBACK, QoS 1 PUBLISH with a PUBACK and PINGREQ with a PINGRESP,
and records what it saw (connects, pings with their times). Enough for the grants real brokers
here do not send (a lowered session expiry, a ServerKeepAlive) and for brokers that close early."""
from __future__ import annotations

import socket
import threading
import time

from lab.broker import free_port


def connack_v5(session_present: bool = False, reason: int = 0, props: bytes = b"") -> bytes:
    body = bytes([1 if session_present else 0, reason, len(props)]) + props
    return bytes([0x20, len(body)]) + body


def prop_u32(ident: int, value: int) -> bytes:
    return bytes([ident]) + value.to_bytes(4, "big")


def prop_u16(ident: int, value: int) -> bytes:
    return bytes([ident]) + value.to_bytes(2, "big")


def _read_packet(conn: socket.socket, buf: bytearray) -> tuple[int, bytes] | None:
    while True:
        if len(buf) >= 2:
            mult, length, i = 1, 0, 1
            while i < len(buf):
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            else:
                i = -1
            if i > 0 and len(buf) >= i + length:
                header, body = buf[0], bytes(buf[i:i + length])
                del buf[:i + length]
                return header, body
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf.extend(chunk)


class FakeBroker:
    """``connack``: bytes sent for every CONNECT, or None to close the connection before any."""

    def __init__(self, connack: bytes | None, close_after_connack: bool = False, refuse: str | None = None,
                 refusals: int = 0) -> None:
        self.port = free_port()
        self.connack = connack
        self.close_after_connack = close_after_connack
        # ``refuse``: a filter whose first ``refusals`` SUBSCRIBEs get reason 0x87 (not authorized)
        self.refuse, self.refusals = refuse, refusals
        self.subscribes: list[list[str]] = []      # the filters of every SUBSCRIBE, in order
        self.connects: list[float] = []
        self.pings: list[float] = []
        self._stop = threading.Event()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", self.port))
        self._srv.listen(16)
        self._srv.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> FakeBroker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._srv.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except OSError:
                continue
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        buf = bytearray()
        conn.settimeout(0.5)
        try:
            while not self._stop.is_set():
                try:
                    pkt = _read_packet(conn, buf)
                except TimeoutError:
                    continue
                if pkt is None:
                    return
                header, body = pkt
                kind = header >> 4
                if kind == 1:                                   # CONNECT
                    self.connects.append(time.monotonic())
                    if self.connack is None:
                        return
                    conn.sendall(self.connack)
                    if self.close_after_connack:
                        return
                elif kind == 8:                                 # SUBSCRIBE (MQTT 5): grant QoS 1 each
                    mid, i, filters = body[:2], 3 + body[2], []  # property length: 0 from paho here
                    while i + 2 <= len(body):
                        n = int.from_bytes(body[i:i + 2], "big")
                        filters.append(body[i + 2:i + 2 + n].decode())
                        i += 2 + n + 1
                    self.subscribes.append(filters)
                    codes = []
                    for f in filters:
                        refused = f == self.refuse and self.refusals > 0
                        codes.append(0x87 if refused else 0x01)
                    if self.refuse in filters and self.refusals > 0:
                        self.refusals -= 1
                    payload = mid + b"\x00" + bytes(codes)
                    conn.sendall(bytes([0x90, len(payload)]) + payload)
                elif kind == 3 and (header >> 1) & 3:           # PUBLISH QoS > 0: PUBACK
                    tlen = int.from_bytes(body[:2], "big")
                    mid = body[2 + tlen:4 + tlen]
                    conn.sendall(bytes([0x40, 2]) + mid)
                elif kind == 12:                                # PINGREQ
                    self.pings.append(time.monotonic())
                    conn.sendall(bytes([0xD0, 0]))
                elif kind == 14:                                # DISCONNECT
                    return
        except OSError:
            return
        finally:
            conn.close()
