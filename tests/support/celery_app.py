"""A tenant's Celery app for the publisher tests: tasks that publish to MQTT from a prefork pool.

Configured only through the environment so the test process (producer) and the worker agree:
- CELERY_FS_DIR: the kombu filesystem transport's folder (no shared Redis state between runs);
- CELERY_DONE_FILE: every task appends one line here when it has finished (how the test knows
  that all tasks ran, without a result backend);
- CELERY_INIT_TOPIC: if set, the worker's main process publishes there through ``mqttd.publish``
  before the pool forks, so every pool process inherits a live publisher;
- CELERY_NAIVE_PORT: if set, the worker's main process creates a module-level plain paho client
  before the pool forks (the seed story), used by ``naive_publish``;
- MQTTD_CONFIG / MQTTD_PROJECT: read by ``mqttd.publish`` in each pool process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from celery import Celery
from celery.signals import worker_init


def make_app(fs_dir: str | Path) -> Celery:
    """A Celery app on kombu's filesystem transport in ``fs_dir`` (the worker's and the producer's)."""
    fs = Path(fs_dir)
    for sub in ("queue", "control"):
        (fs / sub).mkdir(parents=True, exist_ok=True)
    app = Celery("mqttd_test")
    app.conf.update(
        broker_url="filesystem://",
        broker_transport_options={
            "data_folder_in": str(fs / "queue"),
            "data_folder_out": str(fs / "queue"),
            "control_folder": str(fs / "control"),
            "polling_interval": 0.05,
        },
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    return app


app = make_app(os.environ["CELERY_FS_DIR"]) if os.environ.get("CELERY_FS_DIR") else Celery("mqttd_test")

NAIVE = None      # the seed story's module-level client, made in the worker's parent process


def _done(kind: str, seq: int) -> None:
    with open(os.environ["CELERY_DONE_FILE"], "a") as f:     # O_APPEND: one short line, atomic
        f.write(f"{kind} {seq} {os.getpid()}\n")


@app.task(name="mqttd_test.publish_one")
def publish_one(topic: str, seq: int) -> None:
    import mqttd

    mqttd.publish(topic, json.dumps({"seq": seq, "pid": os.getpid()}), qos=1, timeout=10)
    _done("mqttd", seq)


@app.task(name="mqttd_test.naive_publish")
def naive_publish(topic: str, seq: int) -> None:
    """What the seed story did: publish through a client created before the fork."""
    NAIVE.publish(topic, json.dumps({"seq": seq, "pid": os.getpid()}), qos=1)
    _done("naive", seq)


@worker_init.connect
def _before_the_pool_forks(**_: object) -> None:
    global NAIVE
    if os.environ.get("CELERY_INIT_TOPIC"):
        # Code in the worker's main process that publishes (an "online" notice, say): its
        # connection is inherited by every pool process, which must not use it.
        import mqttd

        mqttd.publish(os.environ["CELERY_INIT_TOPIC"], f"worker {os.getpid()} starting", qos=1, timeout=10)
    port = os.environ.get("CELERY_NAIVE_PORT")
    if not port:
        return
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    NAIVE = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"naive-{os.getpid()}", protocol=paho.MQTTv311)
    NAIVE.connect("127.0.0.1", int(port), 30)
    NAIVE.loop_start()
