"""The other members of a shared-subscription group, seen through their canaries (issue 15.6).

Every member of a project subscribes to the canary topic through a share group of its own
(``mqttd.ingest.canary``), so each one receives every member's canary. A member whose canary
stopped while ours still comes back is gone (crashed, cut off, stopped). Mosquitto does not hand
its round-robin share of the group's messages to the others: they wait in its session at the
broker until it returns (delayed, not lost; lost only if the session expires or the broker's
queue limit discards them). The surviving members say so, once in the log and for as long as it
lasts as ``group_warning`` in the status file (docs/brokers.md, "Several hosts").
"""
from __future__ import annotations

import logging

log = logging.getLogger("mqttd.dispatch")

SILENT_AFTER = 3          # canary intervals: a member is silent when ours came back this much later
FORGET_AFTER = 86400.0    # seconds: a member retired for good stops being reported after a day


class Peers:
    def __init__(self) -> None:
        self.last_seen: dict[str, float] = {}      # client id -> wall clock of its last canary here
        self.silent: set[str] = set()

    def seen(self, client: str, now: float) -> None:
        if client in self.silent:
            log.info("group member %s is back (its canary arrives again)", client)
            self.silent.discard(client)
        self.last_seen[client] = now

    def check(self, own_canary_at: float | None, interval: float, now: float) -> str | None:
        """The warning for members silent while our own canary kept coming back, or None.
        Judged against our own canary, so a pause of our own (a reconnect) blames nobody."""
        for client, t in list(self.last_seen.items()):
            if now - t > FORGET_AFTER:
                del self.last_seen[client]
                self.silent.discard(client)
        if own_canary_at is None or interval <= 0:
            return None
        gone = {c: t for c, t in self.last_seen.items() if own_canary_at - t > SILENT_AFTER * interval}
        for client in sorted(gone.keys() - self.silent):
            log.warning("group member %s is silent (last canary %.0f s ago): its share of the group's messages "
                        "waits in its session at the broker until it returns (delayed, not lost)",
                        client, now - gone[client])
        self.silent = set(gone)
        if not gone:
            return None
        members = ", ".join(f"{c} (last canary {now - t:.0f} s ago)" for c, t in sorted(gone.items()))
        return (f"{len(gone)} member(s) of the shared group silent: {members}; their share of the group's "
                f"messages waits in their sessions at the broker until they return (delayed, not lost)")
