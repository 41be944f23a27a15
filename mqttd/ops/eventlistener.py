"""Supervisor event listener: recover a tenant as soon as Supervisor gives up on it (FATAL).

Supervisor never restarts a FATAL program by itself (measured with Supervisor 4.2), and a
cron job may be minutes away. On ``PROCESS_STATE_FATAL`` for a program named ``NAME-mqtt`` whose
project is in the inventory, this listener runs ``mqttd recover``'s logic for that project only.
The crash-loop brake is the same and shared: the restart history lives in RUN_DIR/NAME.recover.json,
so the listener and the cron job together never restart an instance more than
``recover.MAX_RESTARTS`` times an hour. It talks to the supervisord that started it (Supervisor
sets ``SUPERVISOR_SERVER_URL`` for its children).

Install it next to the generated programs, e.g. /etc/supervisor/conf.d/mqttd-recover.conf::

    [eventlistener:mqttd-recover]
    ; the venv that holds mqttd (any tenant's venv with mqttd installed will do)
    command=/opt/mqttd/venv/bin/python -m mqttd.ops.eventlistener --inventory /etc/mqttd/inventory.toml
    events=PROCESS_STATE_FATAL
    ; it writes each project's RUN_DIR/NAME.recover.json: root, or the user owning the run dirs
    user=root
    autostart=true
    autorestart=true
    ; one recovery waits up to 30 s for the tenant to be healthy; FATAL events queue meanwhile
    buffer_size=50
    ; stdout carries the listener protocol: what it did goes to stderr, one line per instance
    stderr_logfile=/var/log/mqttd/recover-listener.log
    stderr_logfile_maxbytes=10MB
    stderr_logfile_backups=5

Then ``supervisorctl reread && supervisorctl update``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from supervisor import childutils

from mqttd.deploy.inventory import load_inventory
from mqttd.deploy.rpc import Supervisor
from mqttd.errors import EXIT_OK, MqttdError
from mqttd.ops.recover import recover_projects

SUFFIX = "-mqtt"


def log(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} mqttd-recover: {line}", file=sys.stderr, flush=True)


def handle(event: dict[str, str], inventory_path: str, supervisor_url: str | None) -> None:
    """One PROCESS_STATE_FATAL event. Never raises: a listener that died on an event would be
    handed the same event again by supervisord, for ever."""
    group = event.get("groupname", "")
    if not group.endswith(SUFFIX):
        return
    name = group[: -len(SUFFIX)]
    try:
        # Read again at every event: the inventory may have changed since the listener started.
        project = next((p for p in load_inventory(inventory_path).projects if p.name == name), None)
        if project is None:
            log(f"{group} is FATAL, but no project {name!r} in {inventory_path}: ignored")
            return
        log(f"{event.get('processname', group)} is FATAL (was {event.get('from_state', '?')}): recovering {name}")
        recover_projects([project], Supervisor.from_args(supervisor_url, os.environ), out=log)
    except MqttdError as exc:
        log(f"{name}: {exc}")
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log(f"{name}: internal error: {type(exc).__name__}: {exc}")


def serve(inventory_path: str, supervisor_url: str | None, stdin: TextIO, protocol: TextIO) -> int:
    """The eventlistener protocol: READY, read one event, act, RESULT 2\\nOK; until stdin closes."""
    while True:
        childutils.listener.ready(protocol)
        line = stdin.readline()
        if not line:
            return EXIT_OK                 # supervisord closed our stdin: it is going away
        headers = childutils.get_headers(line)
        payload = stdin.read(int(headers["len"]))
        if headers.get("eventname") == "PROCESS_STATE_FATAL":
            handle(childutils.get_headers(payload), inventory_path, supervisor_url)
        childutils.listener.ok(protocol)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqttd.ops.eventlistener",
                                     description="Supervisor event listener: mqttd recover on PROCESS_STATE_FATAL")
    parser.add_argument("--inventory", required=True)
    parser.add_argument("--supervisor-url", help="default: $SUPERVISOR_SERVER_URL, set by Supervisor")
    args = parser.parse_args(argv)
    protocol = sys.stdout
    sys.stdout = sys.stderr                # a stray print must never corrupt the protocol stream
    if not os.environ.get("SUPERVISOR_SERVER_URL") and not args.supervisor_url:
        log("warning: not started by supervisord (no SUPERVISOR_SERVER_URL)")
    log(f"waiting for PROCESS_STATE_FATAL of *{SUFFIX} programs (inventory {args.inventory})")
    return serve(args.inventory, args.supervisor_url, sys.stdin, protocol)


if __name__ == "__main__":
    sys.exit(main())
