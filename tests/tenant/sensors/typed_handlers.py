"""Typed payload handlers (docs/handlers.md "Typed payloads"), one per validator the tenant may
have. Imported by mqtt_handlers only with TENANT_TYPED=1: msgspec and pydantic are optional, and
the tests on the floor versions run without them."""
from dataclasses import dataclass, field

import msgspec
import pydantic

from mqttd import Message, route

from .models import Reading


@dataclass
class Telemetry:
    seq: int
    rssi: int
    temp: float
    tags: list[str] = field(default_factory=list)


class TelemetryStruct(msgspec.Struct):
    seq: int
    rssi: int
    temp: float


class TelemetryModel(pydantic.BaseModel):
    seq: int
    rssi: int
    temp: float


@route("typed/dc/{device}", qos=1)
def save_dataclass(msg: Message, device: str, data: Telemetry) -> None:
    assert isinstance(data, Telemetry)
    Reading.objects.create(device=device, seq=data.seq, rssi=data.rssi, temp=data.temp, source="dc")


@route("typed/struct/{device}", qos=1)
def save_struct(msg: Message, device: str, data: TelemetryStruct) -> None:
    assert isinstance(data, TelemetryStruct)
    Reading.objects.create(device=device, seq=data.seq, rssi=data.rssi, temp=data.temp, source="struct")


@route("typed/pydantic/{device}", qos=1)
def save_pydantic(msg: Message, device: str, data: TelemetryModel) -> None:
    assert isinstance(data, TelemetryModel)
    Reading.objects.create(device=device, seq=data.seq, rssi=data.rssi, temp=data.temp, source="pydantic")


@route("typed/batch/{device}", qos=1, batch=True)
def save_typed_batch(msgs: list[Message], data: list[Telemetry]) -> None:
    assert len(msgs) == len(data)
    Reading.objects.bulk_create([Reading(device=m.params["device"], seq=d.seq, rssi=d.rssi, temp=d.temp,
                                         source="typedbatch") for m, d in zip(msgs, data, strict=True)])


@route("tbulk/{device}/telemetry", qos=1, batch=True)
def save_many_typed(msgs: list[Message], data: list[Telemetry]) -> None:
    """scripts/bench's typed twin of mqtt_handlers.save_many (batch=True, untyped)."""
    Reading.objects.bulk_create([Reading(device=m.params["device"], seq=d.seq, rssi=d.rssi, temp=d.temp,
                                         source="tbulk") for m, d in zip(msgs, data, strict=True)])
