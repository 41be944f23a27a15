"""Which MQTT version a process speaks: ``protocol = "5"``, ``"3.1.1"`` or ``"auto"`` (docs/brokers.md).

"auto" is MQTT 5, and 3.1.1 when the broker refuses version 5, decided once and kept for the life
of the process (a restart negotiates again). Brokers refuse 5 in two ways:

- a CONNACK saying "Unsupported protocol version" (0x84 on 5; return code 1 from a 3.1.1-only
  broker, which paho decodes the same way): NATS 2.9, aedes, amqtt. Conclusive at once;
- closing the connection before any CONNACK: RabbitMQ before 3.13. A broker that is restarting
  does that too, so it counts only twice in a row, soon after the CONNECT, and 3.1.1 is chosen only
  once a 3.1.1 CONNECT is then actually accepted (otherwise the next attempt is MQTT 5 again).

An explicit ``"5"`` against a broker that refuses it is a configuration error (exit 78 with the
reason), never a retry loop: on the conclusive CONNACK at once; on closes before CONNACK once a
3.1.1 CONNECT from a throwaway client (its own client id, clean session, so it touches no session)
is accepted where 5 was not. Both only before the first connection of the process, as for refused
credentials: a broker that accepted 5 once and refuses it later is retried with backoff.
"""
from __future__ import annotations

import ssl
import threading
import time

from paho.mqtt.enums import MQTTErrorCode

from mqttd.config import BrokerConfig
from mqttd.errors import ConfigError
from mqttd.mqtt.client import UNSUPPORTED_PROTOCOL, new_client

V5, V311 = "5", "3.1.1"
EARLY_CLOSE_S = 5.0      # a close this soon after CONNECT, without a CONNACK, may be a refusal of 5
CLOSES_TO_SUSPECT = 2    # ... and this many in a row make it one worth a 3.1.1 attempt

# What Negotiation.failed() asks the session to do next
RETRY, TRY_311, BACK_TO_5, CONFIRM_311, REFUSED = "retry", "try-3.1.1", "back-to-5", "confirm-3.1.1", "refused"


class Negotiation:
    """The protocol of one process's connections. ``protocol`` is what the next CONNECT speaks."""

    def __init__(self, configured: str) -> None:
        self.configured = configured
        self.protocol = V311 if configured == V311 else V5
        self.settled = configured != "auto"       # "auto" settles at its first successful CONNACK
        self.reason: str | None = None            # why 5 was given up, said in the log, status and check
        self._closes = 0

    @property
    def v5(self) -> bool:
        return self.protocol == V5

    def connected(self) -> str | None:
        """A successful CONNACK on ``protocol``. Returns the line to log (once) when it settles "auto"."""
        self._closes = 0
        if self.settled:
            return None
        self.settled = True
        if self.protocol == V311:
            return (f"the broker refused MQTT 5 ({self.reason}): speaking MQTT 3.1.1 for the life of this "
                    'process (protocol = "auto"; negotiated again at the next start)')
        return None

    def failed(self, *, unsupported: bool, closed_early: bool, ever_connected: bool) -> str:
        """A connection attempt ended before any successful CONNACK: what to do next.

        ``unsupported``: the CONNACK said "unsupported protocol version"; ``closed_early``: no
        CONNACK at all, the broker closed within ``EARLY_CLOSE_S`` of the CONNECT."""
        if self.protocol == V311:
            if not self.settled and self.configured == "auto":
                self.protocol = V5                 # 3.1.1 was no better: the broker is not refusing 5
                self.reason = None
                self._closes = 0
                return BACK_TO_5
            return RETRY
        self._closes = self._closes + 1 if closed_early else 0
        if unsupported:
            why = "CONNACK: Unsupported protocol version"
        elif self._closes >= CLOSES_TO_SUSPECT:
            why = f"it closed the connection before any CONNACK, {self._closes} times in a row"
        else:
            return RETRY
        if self.configured == "auto" and not self.settled:
            self.protocol, self.reason = V311, why
            return TRY_311
        if self.configured == V5 and not ever_connected:
            self.reason = why
            return REFUSED if unsupported else CONFIRM_311
        return RETRY

    def refusal(self, broker: BrokerConfig) -> ConfigError:
        return ConfigError(f'the broker at {broker.host}:{broker.port} refuses MQTT 5 ({self.reason}) and '
                           'protocol = "5" asks for it: set protocol = "auto" (5 where the broker has it, else '
                           '3.1.1) or "3.1.1"', key="broker.protocol")


OK_RC = (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN)


def attempt(broker: BrokerConfig, client_id: str, protocol: str, timeout: float) -> tuple[str, int | None, str]:
    """One throwaway CONNECT with ``protocol`` (clean session: no session is touched), disconnected
    at once: ("ok" | "refused" | "closed" | "error", the CONNACK code, a text saying what happened)."""
    c = new_client(broker, client_id, persistent=False, reconnect_on_failure=False, protocol=protocol)
    got: list[tuple[bool, int, str]] = []
    c.on_connect = lambda cl, u, f, rc, p: got.append((rc.is_failure, rc.value, str(rc)))  # noqa: ARG005
    try:
        if protocol == V5:
            c.connect(broker.host, broker.port, broker.keepalive, clean_start=True)
        else:
            c.connect(broker.host, broker.port, broker.keepalive)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return "error", None, f"cannot connect to {broker.host}:{broker.port}: {exc}"
    deadline = time.monotonic() + timeout
    try:
        while not got and time.monotonic() < deadline:
            if c.loop(0.1) not in OK_RC:
                break
    finally:
        try:
            c.disconnect()
        except Exception:  # noqa: BLE001
            pass
    if got:
        failure, code, text = got[0]
        return ("refused" if failure else "ok"), code, text
    if time.monotonic() >= deadline:
        return "error", None, f"no answer from {broker.host}:{broker.port} within {timeout:.0f}s"
    return "closed", None, "the broker closed the connection before any CONNACK"


def speaks_311(broker: BrokerConfig, client_id: str, timeout: float = 5.0) -> bool:
    """Does the broker accept a 3.1.1 CONNECT? (A throwaway client with its own id.)"""
    return attempt(broker, client_id, V311, timeout)[0] == "ok"


def refusal_of_5(broker: BrokerConfig, client_id: str, timeout: float) -> tuple[str | None, str]:
    """Why the broker refuses MQTT 5, when it does and accepts 3.1.1 instead (else None), and the
    outcome of the MQTT 5 attempt ("ok", "refused", "closed", "error"). Two throwaway CONNECTs at
    most; used where the answer must come before the real connection (``mqttd check``)."""
    outcome, code, _ = attempt(broker, client_id, V5, timeout)
    if outcome == "ok" or outcome == "error" or (outcome == "refused" and code not in UNSUPPORTED_PROTOCOL):
        return None, outcome
    why = "CONNACK: Unsupported protocol version" if outcome == "refused" else \
        "it closed the connection before any CONNACK"
    if not speaks_311(broker, client_id, timeout):
        return None, outcome          # 3.1.1 no better: not a refusal of 5
    return why, outcome


# What the publishers of this process settled per broker (host, port): a forked child inherits it.
_PUBLISHER_PROTOCOL: dict[tuple[str, int], str] = {}
_PUBLISHER_LOCK = threading.Lock()


def publisher_negotiation(broker: BrokerConfig) -> Negotiation:
    """The negotiation of a publisher's connection: what an earlier connection of this process
    settled for this broker, else the configured protocol ("auto": MQTT 5 first, settled at the
    connection's own first CONNACK; ``mqttd.mqtt.outbound``)."""
    neg = Negotiation(broker.protocol)
    if neg.configured == "auto":
        with _PUBLISHER_LOCK:
            known = _PUBLISHER_PROTOCOL.get((broker.host, broker.port))
        if known is not None:
            neg.protocol, neg.settled = known, True
    return neg


def remember_publisher_protocol(broker: BrokerConfig, protocol: str) -> None:
    """A publisher's "auto" settled on ``protocol``: later connections of this process start there."""
    with _PUBLISHER_LOCK:
        _PUBLISHER_PROTOCOL[(broker.host, broker.port)] = protocol
