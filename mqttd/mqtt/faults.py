"""Fault injection for tests: the one seam through which a test makes the session misbehave.

Production code never sets anything here. A test tenant sets ``hooks`` from its own module
(e.g. ``mqtt_handlers``, imported before the session starts) when its test asks for a fault:

    from mqttd.mqtt import faults

    faults.hooks.before_intake = lambda topic: ...   # raise to simulate a bug in the network thread
    faults.hooks.resubscribe = False                   # the zombie consumer: subscribe once only

The session reads ``hooks`` where each fault applies (never a copy), so the order of imports
does not matter; tests/tenant/sensors/mqtt_handlers.py shows both in use.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Hooks:
    # Called on the network thread with the topic (bytes) of every PUBLISH before it goes into the
    # intake; an exception ends the network thread as a bug in the session's own code would.
    before_intake: Callable[[bytes], None] | None = None
    # False: subscribe on the process's first connection only, as a consumer that forgets to
    # resubscribe does (after a broker lost its session it is "connected" and receives nothing).
    resubscribe: bool = True


hooks = Hooks()
