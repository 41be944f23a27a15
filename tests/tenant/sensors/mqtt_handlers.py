"""The tenant's routes, discovered by mqttd at start-up."""
import os

from django.conf import settings

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
        if data.get("operational"):      # a database error that looks like an outage
            from django.db import OperationalError

            raise OperationalError(f"simulated: server closed the connection (seq {data.get('seq')})")
        rows.append(Reading(device=m.params["device"], seq=data["seq"], rssi=data.get("rssi"),
                            temp=data.get("temp"), source="bulk"))
    Reading.objects.bulk_create(rows)


def _seq_key(msg: Message) -> str:
    return f"{msg.params['device']}:{msg.json()['seq']}"


def save_once(msg: Message, device: str) -> None:
    data = msg.json()
    if data.get("fail") and not os.environ.get("TENANT_FIXED"):
        raise ValueError(f"told to fail (seq {data.get('seq')})")
    Reading.objects.create(device=device, seq=data["seq"], rssi=data.get("rssi"), source="dedupe")


if "mqttd.django" in settings.INSTALLED_APPS:       # dedupe keys live in mqttd's app
    route("dedupe/{device}/telemetry", qos=1, dedupe=_seq_key)(save_once)


@route("strict/{code}", qos=1)
def save_strict(msg: Message, code: str) -> None:
    Strict.objects.create(code=code)


# Typed payloads (msgspec and pydantic are optional: only when the test asks for them).
if os.environ.get("TENANT_TYPED"):
    from . import typed_handlers  # noqa: F401


# Test hook: simulate a bug inside paho's network-thread callback (the classic way a paho
# client dies silently). Only active when the test asks for it.

if os.environ.get("TENANT_BREAK_CALLBACK"):
    from mqttd.mqtt import faults

    def _buggy(topic: bytes) -> None:
        if topic == b"ble/boom/telemetry":
            raise RuntimeError("bug in on_message")

    faults.hooks.before_intake = _buggy


# Test hook: the zombie consumer of a broker restarted without its sessions. The daemon
# subscribes on the process's first connect only, so after the broker forgets the session it is
# "connected" and receives nothing (the canary stops). A restart (mqttd recover) cures it.
if os.environ.get("TENANT_NO_RESUBSCRIBE"):
    from mqttd.mqtt import faults

    faults.hooks.resubscribe = False


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


# Test hook: handlers that break the handler contract the way real tenant code does, without
# raising. Each stores its reading first, then:
#   contract/swallow/{device}   the insert-or-ignore idiom: `except IntegrityError: pass`
#   contract/close/{device}     connection.close() ("tidying up")
#   contract/tidy/{device}      close_old_connections() (copied from a Celery task)
#   contract/rollback/{device}  a raw ROLLBACK on the connection
if os.environ.get("TENANT_CONTRACT"):
    from django.db import IntegrityError, close_old_connections, connection

    @route("contract/swallow/{device}", qos=1)
    def tag_once(msg: Message, device: str) -> None:
        data = msg.json()
        Reading.objects.create(device=device, seq=data["seq"], source="swallow")
        try:
            Strict.objects.create(code=data["tag"])
        except IntegrityError:
            pass        # "the tag exists already, fine"

    @route("contract/close/{device}", qos=1)
    def save_and_close(msg: Message, device: str) -> None:
        Reading.objects.create(device=device, seq=msg.json()["seq"], source="close")
        connection.close()

    @route("contract/tidy/{device}", qos=1)
    def save_and_tidy(msg: Message, device: str) -> None:
        Reading.objects.create(device=device, seq=msg.json()["seq"], source="tidy")
        close_old_connections()

    @route("contract/closeraise/{device}", qos=1)
    def close_then_fail(msg: Message, device: str) -> None:
        Reading.objects.create(device=device, seq=msg.json()["seq"], source="closeraise")
        close_old_connections()
        Reading.objects.create(device=device, seq=msg.json()["seq"], source="closeraise")   # raises

    @route("contract/oncommit/{device}", qos=1)
    def save_and_notify(msg: Message, device: str) -> None:
        from django.db import transaction

        def notify() -> None:
            raise RuntimeError("the notification service is down")     # after the COMMIT

        Reading.objects.create(device=device, seq=msg.json()["seq"], source="oncommit")
        transaction.on_commit(notify)

    @route("contract/fk/{device}", qos=1)
    def save_with_a_dangling_key(msg: Message, device: str) -> None:
        # A foreign key to nothing: Django's constraints are DEFERRABLE INITIALLY DEFERRED, so
        # the violation shows only at COMMIT, for the whole batch.
        from django.contrib.auth.models import Permission

        Permission.objects.create(codename=f"p{msg.json()['seq']}", name="p", content_type_id=10**9)

    @route("contract/rollback/{device}", qos=1)
    def save_and_roll_back(msg: Message, device: str) -> None:
        Reading.objects.create(device=device, seq=msg.json()["seq"], source="rollback")
        with connection.cursor() as cur:
            cur.execute("ROLLBACK")


# Test hook: a resolver that hangs. With TENANT_SLOW_DNS_S set, the first TENANT_SLOW_DNS_CALLS
# (default 1) host lookups made by the daemon's network thread sleep that many seconds first:
# paho's connect_timeout does not bound getaddrinfo, so a connect blocks the thread that long.
if os.environ.get("TENANT_SLOW_DNS_S"):
    import socket as _dns_socket
    import threading as _dns_threading
    import time as _dns_time

    _DNS_DELAY_S = float(os.environ["TENANT_SLOW_DNS_S"])
    _dns_slow_left = [int(os.environ.get("TENANT_SLOW_DNS_CALLS", "1"))]
    _real_getaddrinfo = _dns_socket.getaddrinfo

    def _slow_getaddrinfo(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if _dns_slow_left[0] > 0 and _dns_threading.current_thread().name.startswith("mqttd-net"):
            _dns_slow_left[0] -= 1
            _dns_time.sleep(_DNS_DELAY_S)
        return _real_getaddrinfo(*args, **kwargs)

    _dns_socket.getaddrinfo = _slow_getaddrinfo
