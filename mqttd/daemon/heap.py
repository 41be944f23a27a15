"""Python's cycle collector, set for a daemon that moves many short-lived objects through queues.

With CPython's defaults (a collection of the youngest generation every 700 net allocations of
container objects, of every generation after ten of the one below) the collector cost the batch
route 10-12 us a message (``scripts/bench_gaps.py``, SQLite, 40,000 messages, timed with
``gc.callbacks``): seven or eight full collections of ~45 ms each, every one walking every object
alive: Django's, the tenant's apps', and the messages waiting in the intake. Messages carrying
MQTT 5 properties made it worse (more containers alive per queued message), which is most of what
gap detection's stamp cost the daemon. Two settings, made once start-up is done:

- ``gc.freeze()``: what Django, the tenant's apps and the routes built at start-up moves to a
  generation no collection walks again (it lives as long as the process anyway);
- a youngest-generation threshold of 50,000: messages, rows and model instances are freed by
  reference counting as soon as their batch commits; the collector is only for reference cycles,
  and it still runs after 50,000 net new containers (a few MB at most).

Measured after: no collection at all during the same drain.
"""
from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def settle() -> None:
    """Freeze what start-up built and raise the youngest generation's threshold (the older two keep
    CPython's defaults)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
