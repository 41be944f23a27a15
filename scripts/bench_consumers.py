#!/usr/bin/env python3
"""The reference consumers `scripts/bench` runs beside mqttd (not product code).

  bare  : paho-mqtt loop_forever, manual ack in on_message, counts only (the receive ceiling)
  naive : the pattern people write today: paho on_message -> json.loads -> Reading.objects.create
          per message, paho's automatic ack after on_message (one transaction per row)
Both consume a persistent session that the bench filled before starting them, and exit after N.

  orm-create, orm-bulk : no MQTT at all: the tenant's handler work alone on the same payloads, in
          transactions of 500 (json.loads + objects.create each / json.loads + Reading() +
          bulk_create). The ceiling the per-message and batch=True routes can reach.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["bare", "naive", "orm-create", "orm-bulk"])
    ap.add_argument("--port", type=int)
    ap.add_argument("--client-id")
    ap.add_argument("--topic")
    ap.add_argument("-n", type=int, required=True)
    args = ap.parse_args()

    if args.kind != "bare":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "tenant"))
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tenant_site.settings")
        import django

        django.setup()
        from sensors.models import Reading

    if args.kind.startswith("orm-"):
        return orm_alone(args.kind, args.n, Reading)

    count = 0
    t_first = t_last = 0.0

    def on_message(client, userdata, msg):  # noqa: ANN001
        nonlocal count, t_first, t_last
        if count == 0:
            t_first = time.time()
        if args.kind == "naive":
            data = json.loads(msg.payload)
            Reading.objects.create(device=msg.topic.split("/")[1], seq=data["seq"], rssi=data["rssi"],
                                   temp=data["temp"], source="naive")
        else:
            client.ack(msg.mid, msg.qos)
        count += 1
        if count >= args.n:
            t_last = time.time()
            client.disconnect()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False,
                         protocol=paho.MQTTv311, manual_ack=args.kind == "bare")
    client.on_message = on_message
    client.connect("127.0.0.1", args.port, 60)
    client.loop_forever()
    print(json.dumps({"count": count, "t_first": t_first, "t_last": t_last}))
    return 0


def orm_alone(kind: str, n: int, Reading) -> int:  # noqa: ANN001, N803
    from django.db import transaction

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # lab
    from lab.publish import ble_payload

    payloads = [(f"ble-{i % 50 + 1:04d}", ble_payload(i)) for i in range(n)]
    t_first = time.time()
    for start in range(0, n, 500):
        with transaction.atomic():
            rows = []
            for device, raw in payloads[start:start + 500]:
                data = json.loads(raw)
                row = Reading(device=device, seq=data["seq"], rssi=data["rssi"], temp=data["temp"], source="orm")
                if kind == "orm-create":
                    row.save(force_insert=True)       # what objects.create does
                else:
                    rows.append(row)
            if rows:
                Reading.objects.bulk_create(rows)
    print(json.dumps({"count": n, "t_first": t_first, "t_last": time.time()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
