"""The session's subscriptions: the routed filters on every connect, and the unsubscribe of
filters no longer routed.

The filters subscribed last are remembered in the run dir (``NAME.subscriptions.json``): the
broker keeps a persistent session's subscriptions across restarts, so a filter removed from the
routes would otherwise go on collecting messages nobody handles. The file's existence also says
that this name had a session before (a CONNACK without one is then a session gap).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqttd.mqtt.shared import SharedCheck

log = logging.getLogger("mqttd.session")


class RememberedFilters:
    def __init__(self, path: Path | None, client_id: str) -> None:
        self.path, self.client_id = path, client_id

    def existed(self) -> bool:
        return bool(self.path and self.path.exists())

    def read(self) -> list[str]:
        if not self.path:
            return []
        try:
            data = json.loads(self.path.read_text())
            return [s for s in data.get("filters", []) if isinstance(s, str)]
        except (OSError, ValueError, AttributeError):
            return []

    def write(self, filters: list[str]) -> None:
        if not self.path:
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"client_id": self.client_id, "filters": filters}))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot record subscriptions in %s: %s", self.path, exc)


def subscribe(client: paho.Client, v5: bool, subscriptions: list[tuple[str, int]], owner_topic: str | None,
              remembered: RememberedFilters) -> int | None:
    """Subscribe to the routed filters, then unsubscribe the stale ones (in that order: a stale
    filter may overlap a new one, and unsubscribing first would leave a gap in which the broker
    delivers matching messages to neither). Returns the packet id of the routed SUBSCRIBE."""
    previous = remembered.read()
    wanted = [s for s, _ in subscriptions]
    stale = [s for s in previous if s not in wanted]
    topics: list[tuple[str, SubscribeOptions]] | list[tuple[str, int]]
    if v5:
        # retainHandling=1: retained messages only for a subscription that did not exist yet.
        topics = [(s, SubscribeOptions(qos=q, retainHandling=1)) for s, q in subscriptions]
    else:
        topics = list(subscriptions)
    mid = client.subscribe(topics)[1] if topics else None
    if owner_topic:   # QoS 0, always with the retained record (not part of the session's routes)
        if v5:
            client.subscribe(owner_topic, options=SubscribeOptions(qos=0, retainHandling=0))
        else:
            client.subscribe(owner_topic, 0)
    if stale:
        log.info("unsubscribing filters no longer routed: %s", ", ".join(stale))
        client.unsubscribe(stale)
    remembered.write(wanted)
    return mid


def suback_failures(subscriptions: list[tuple[str, int]], reason_codes: list, shared: SharedCheck | None
                    ) -> tuple[tuple[str, ...], Exception | None]:
    """The SUBACK of the routed SUBSCRIBE: the refused filters ("filter: reason", each logged),
    and the error to stop with if a refused filter is a $share/ one the daemon needs."""
    failures, err = [], None
    for (sub, qos), rc in zip(subscriptions, reason_codes):
        if shared is not None and rc.is_failure:
            err = err or shared.suback(sub, True, str(rc))
        if rc.is_failure:
            failures.append(f"{sub}: {rc}")
        elif rc.value < qos:
            log.warning("broker granted QoS %d for %s (asked %d)", rc.value, sub, qos)
    for f in failures:
        log.error("broker refused subscription %s", f)
    return tuple(failures), err


class SubscribeRetry:
    """A routed filter the broker refused is asked for again, with backoff, for as long as the
    connection lasts: a broker often refuses only for a while (a cluster electing the leader of
    the session's stream, an ACL the operator is about to fix), and without a retry that filter
    would stay unsubscribed until the process restarts. Health says unhealthy meanwhile
    (``subscribe_failures``) and recovers with the SUBACK that grants every filter."""

    FIRST_S = 2.0
    MAX_S = 60.0

    def __init__(self, clock=time.monotonic) -> None:  # noqa: ANN001 - a clock for tests
        self.clock = clock
        self.due: float | None = None
        self.delay = self.FIRST_S

    def refused(self) -> float:
        """A SUBACK refused some filter: ask again after the current delay (then twice as long)."""
        wait = self.delay
        self.due = self.clock() + wait
        self.delay = min(self.delay * 2, self.MAX_S)
        return wait

    def granted(self) -> None:
        """Every filter granted: nothing to retry, and the next refusal starts short again."""
        self.due, self.delay = None, self.FIRST_S

    def cancel(self) -> None:
        """A new connection subscribes anyway (the delay keeps growing if the broker goes on refusing)."""
        self.due = None

    def ready(self) -> bool:
        if self.due is not None and self.clock() >= self.due:
            self.due = None
            return True
        return False
