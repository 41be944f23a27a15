"""The tenant's routes, discovered by mqttd at start-up."""
import os

from mqttd import Message, route

from .models import Reading, Strict


@route("ble/{device}/telemetry", qos=1)
def save_reading(msg: Message, device: str) -> None:
    data = msg.json()
    if data.get("fail") and not os.environ.get("TENANT_FIXED"):   # TENANT_FIXED: "the bug is fixed"
        raise ValueError(f"told to fail (seq {data.get('seq')})")
    Reading.objects.create(device=device, seq=data["seq"], rssi=data.get("rssi"), temp=data.get("temp"))


@route("bulk/{device}/telemetry", qos=1, batch=True)
def save_many(msgs: list[Message]) -> None:
    rows = []
    for m in msgs:
        data = m.json()
        if data.get("fail"):
            raise ValueError(f"told to fail (seq {data.get('seq')})")
        rows.append(Reading(device=m.params["device"], seq=data["seq"], rssi=data.get("rssi"),
                            temp=data.get("temp"), source="bulk"))
    Reading.objects.bulk_create(rows)


def _seq_key(msg: Message) -> str:
    return f"{msg.topic}:{msg.json()['seq']}"


@route("dedupe/{device}/telemetry", qos=1, dedupe=_seq_key)
def save_once(msg: Message, device: str) -> None:
    data = msg.json()
    Reading.objects.create(device=device, seq=data["seq"], rssi=data.get("rssi"), source="dedupe")


@route("strict/{code}", qos=1)
def save_strict(msg: Message, code: str) -> None:
    Strict.objects.create(code=code)


# Test hook: simulate a bug inside paho's network-thread callback (the classic way a paho
# client dies silently). Only active when the test asks for it.

if os.environ.get("TENANT_BREAK_CALLBACK"):
    from mqttd.mqtt import session as transport

    _original = transport.Session._on_publish

    def _buggy(self, topic, *args):  # noqa: ANN001, ANN002
        if topic == b"ble/boom/telemetry":
            raise RuntimeError("bug in on_message")
        return _original(self, topic, *args)

    transport.Session._on_publish = _buggy


# Test hook: the zombie consumer of a broker restarted without its sessions. The daemon
# subscribes on the process's first connect only, so after the broker forgets the session it is
# "connected" and receives nothing (the canary stops). A restart (mqttd recover) cures it.
if os.environ.get("TENANT_NO_RESUBSCRIBE"):
    from mqttd.mqtt import session as _transport

    _subscribe = _transport.Session._subscribe
    _first_connect = [True]

    def _subscribe_on_first_connect_only(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if _first_connect[0]:
            _first_connect[0] = False
            return _subscribe(self, *args, **kwargs)
        return None

    _transport.Session._subscribe = _subscribe_on_first_connect_only


# Test hook: a handler stuck for ever (think of a network call without a timeout), once. The
# first message on stuck/{device} creates the marker file named by TENANT_STUCK_ONCE and hangs
# the dispatcher; its redelivery after a restart is stored normally.
_STUCK_MARKER = os.environ.get("TENANT_STUCK_ONCE")
if _STUCK_MARKER:
    import threading

    @route("stuck/{device}", qos=1)
    def stuck_once(msg: Message, device: str) -> None:
        try:
            os.close(os.open(_STUCK_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            Reading.objects.create(device=device, seq=0, source="stuck")
            return
        threading.Event().wait()


# Test hook: handlers that hang for ever on a payload with "hang": true (a poison message).
if os.environ.get("TENANT_HANG"):
    import threading as _threading

    @route("hang/{device}", qos=1)
    def hang_one(msg: Message, device: str) -> None:
        data = msg.json()
        if data.get("hang"):
            _threading.Event().wait()
        Reading.objects.create(device=device, seq=data["seq"], source="hang")

    @route("hanglot/{device}", qos=1, batch=True)
    def hang_many(msgs: list[Message]) -> None:
        rows = []
        for m in msgs:
            data = m.json()
            if data.get("hang"):
                _threading.Event().wait()
            rows.append(Reading(device=m.params["device"], seq=data["seq"], source="hanglot"))
        Reading.objects.bulk_create(rows)


# Test hook: a second route on the dedupe topics, without a key, so that one message is a
# duplicate for one of its routes and new for the other.
if os.environ.get("TENANT_OVERLAP"):

    @route("dedupe/{device}/telemetry", qos=1)
    def save_every_copy(msg: Message, device: str) -> None:
        Reading.objects.create(device=device, seq=msg.json()["seq"], source="every")


# Test hook: a handler slower than the traffic (TENANT_SLOW_MS per message), so that the daemon
# falls behind and its intake stays full for longer than the keepalive.
if os.environ.get("TENANT_SLOW_MS"):
    import time as _time

    _SLOW_S = int(os.environ["TENANT_SLOW_MS"]) / 1000

    @route("slow/{device}", qos=1)
    def save_slowly(msg: Message, device: str) -> None:
        _time.sleep(_SLOW_S)
        Reading.objects.create(device=device, seq=msg.json()["seq"], source="slow")


# Test hook: the chaos soak (scripts/soak). TENANT_SOAK_PREFIX=<tenant> gives this tenant topics
# of its own, so three tenants share one broker without receiving each other's traffic:
#   soak/PREFIX/{device}   per message, no dedupe key  (source "soak")
#   soakd/PREFIX/{device}  per message, dedupe key on topic+seq  (source "soakd")
#   soakb/PREFIX/{device}  batch=True, bulk_create, no dedupe key  (source "soakb")
# A payload with "fail": true raises, so the message becomes a dead letter.
_SOAK_PREFIX = os.environ.get("TENANT_SOAK_PREFIX")
if _SOAK_PREFIX:

    def _soak_reading(msg: Message, device: str, source: str) -> Reading:
        data = msg.json()
        if data.get("fail"):
            raise ValueError(f"soak: told to fail ({source} seq {data.get('seq')})")
        return Reading(device=device, seq=data["seq"], source=source)

    @route(f"soak/{_SOAK_PREFIX}/{{device}}", qos=1)
    def soak_plain(msg: Message, device: str) -> None:
        _soak_reading(msg, device, "soak").save()

    @route(f"soakd/{_SOAK_PREFIX}/{{device}}", qos=1, dedupe=_seq_key)
    def soak_dedupe(msg: Message, device: str) -> None:
        _soak_reading(msg, device, "soakd").save()

    @route(f"soakb/{_SOAK_PREFIX}/{{device}}", qos=1, batch=True)
    def soak_batch(msgs: list[Message]) -> None:
        Reading.objects.bulk_create([_soak_reading(m, m.params["device"], "soakb") for m in msgs])
