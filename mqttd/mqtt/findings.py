"""What ``mqttd check``'s broker probe found (``ProbeResult``) and the known caveats of the broker
it found (``caveats``): which broker it is, and what of it bears on the delivery promise or the
speed. Pure: ``mqttd.mqtt.probe`` does the probing and fills the result; ``mqttd.ops.check``
prints it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mqttd.mqtt import grants as grants_mod

WINDOW_MESSAGES = 50      # QoS 1 messages sent to measure the in-flight window ("at least" when all come)


@dataclass
class ProbeResult:
    connected: bool
    error: str | None = None
    granted: list[tuple[str, str]] | None = None    # (subscription, reason)
    dropped: int | None = None                       # $SYS/broker/publish/messages/dropped
    auth_refused: bool = False                       # CONNACK said: bad credentials / not authorised
    shared: bool | None = None                       # a round trip through a $share/ filter (None: not tried)
    shared_reason: str = ""
    protocol: str | None = None                      # spoken: "5" or "3.1.1"
    protocol_note: str | None = None                 # why 5 was not spoken ("auto")
    protocol_refused: str | None = None              # protocol = "5" and the broker refuses it: why
    grants: grants_mod.Grants | None = None
    window: int | None = None                        # QoS 1 messages delivered un-acked before it stalled
    window_of: int = WINDOW_MESSAGES
    session_kept: bool | None = None                 # persistent session present on the second connect
    session_note: str = ""
    qos2_granted: bool | None = None                 # a QoS 2 subscription granted QoS 2
    version: str | None = None                       # $SYS/broker/version
    broker_kind: str | None = None                   # "mosquitto", "rabbitmq", "nats", ...
    caveats: list[str] = field(default_factory=list)


def caveats(r: ProbeResult) -> tuple[str | None, list[str]]:
    """Which broker it is, and what of it bears on the delivery promise or the speed."""
    kind = r.broker_kind
    version = (r.version or "").lower()
    if "mosquitto" in version:
        kind = "mosquitto"
    elif "emqx" in version:
        kind = "emqx"
    elif "vernemq" in version:
        kind = "vernemq"
    elif kind is None and r.protocol_note and "Unsupported protocol version" in r.protocol_note:
        # NATS grants QoS 1 for QoS 2; aedes and amqtt (also 3.1.1-only) grant 2
        kind = "nats" if r.qos2_granted is False else "3.1.1-only (aedes and amqtt behave so)"
    out = []
    if kind == "mosquitto":
        out += ["Mosquitto: max_queued_messages (default 1000) discards an offline client's newest messages while "
                "still acknowledging the publisher: size it for the longest outage (e.g. max_queued_messages "
                "1000000); persistence true with a short autosave_interval, or a broker restart loses the queue",
                "Mosquitto: max_inflight_messages (default 20) caps the in-flight window of MQTT 3.1.1 clients "
                "(MQTT 5 clients get their receive maximum) and paces a QoS 2 backlog: raise it (e.g. 1000) "
                "for speed"]
    if kind == "rabbitmq":
        out.append("RabbitMQ: mqtt.prefetch (default 10) caps the in-flight window: intake is several times "
                   "slower than batch_size allows; raise it in rabbitmq.conf (e.g. mqtt.prefetch = 1000)")
    if kind == "nats":
        out.append("NATS: an un-acked message comes back only after the ack wait (mqtt { ack_wait: 30s } by "
                   "default), so a restart delays redelivery by up to that; no $share/ filters")
    if r.window is not None and r.window < r.window_of:
        out.append(f"in-flight window {r.window}: at most {r.window} messages are delivered before the first "
                   "is acknowledged, so a batch never holds more than that")
    if r.session_kept is False:
        out.append("the broker keeps no persistent session for this client (e.g. amqtt for anonymous clients): "
                   "messages published while mqttd is down or restarting are lost")
    return kind, out
