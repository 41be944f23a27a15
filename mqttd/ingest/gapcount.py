"""Gap detection, the count (docs/operations.md): ``publisher_gaps`` of a project, from the ranges
``mqttd.ingest.gaps`` records, on a thread of its own; and the table's housekeeping.

Counting reads the whole project's table (every instance of the project reports the same number)
and applies ``mqttd.ingest.gaps.holes``; when to count is the point of this module: an idle
project must cost no queries (issue 12.8: an idle daemon under 0.1% of a core)."""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from mqttd.ingest.gaps import holes

log = logging.getLogger("mqttd.gaps")


class GapCounter:
    """``publisher_gaps`` of ``project``, computed from the table in a thread of its own. ``value``
    is the last count (None until the first one succeeds); a failed count keeps it and is logged.

    An idle project costs no query: the thread counts when this instance committed stamps
    (``nudge``, at most once per ``every`` s), when the earliest open hole's settle window ends,
    and otherwise every ``min(settle_s, 30)`` s, which is how soon another instance's commits
    show here."""

    FALLBACK_S = 30.0
    PRUNE_AFTER = dt.timedelta(days=7)   # a publisher id lives as long as one process's connection
    PRUNE_EVERY_S = 3600.0

    def __init__(self, project: str, settle_s: float) -> None:
        self.project, self.settle_s = project, settle_s
        self.value: int | None = None
        self.error: str | None = None
        self._next_due = 0.0                 # time.monotonic() of the next count with no nudge
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_prune = 0.0               # time.monotonic(): at start, then hourly

    def nudge(self) -> None:
        """A batch with stamps committed: count again soon."""
        self._wake.set()

    def refresh(self) -> int | None:
        from django.db import close_old_connections
        from django.utils import timezone

        from mqttd.django.models import PublisherRange

        quiet = min(self.settle_s, self.FALLBACK_S)
        try:
            close_old_connections()
            rows = (PublisherRange.objects.filter(project=self.project).order_by("pub", "first")
                    .values_list("pub", "first", "last", "first_seen_at").iterator(chunk_size=2000))
            now = timezone.now()
            found = holes(rows, now - dt.timedelta(seconds=self.settle_s))
            self.value, self.error = found.gaps, None
            if found.next_settle is not None:    # a hole starts counting then: look at it then
                settles_in = (found.next_settle - now).total_seconds() + self.settle_s + 0.05
                quiet = max(0.0, min(quiet, settles_in))
        except Exception as exc:  # noqa: BLE001 - the status loop must go on (a database outage, say)
            if self.error is None:
                log.warning("cannot count publisher gaps: %s", exc)
            self.error = str(exc)[:300]
            quiet = 0.0                          # try again after ``every``
            from django.db import connection

            connection.close_if_unusable_or_obsolete()
        self._next_due = time.monotonic() + quiet
        return self.value

    def prune(self) -> int:
        """Forget the publishers with nothing missing (one range) whose last number arrived more
        than ``PRUNE_AFTER`` ago: every publishing process has its own id, so without this the table
        grows with every process ever started. The count does not change (a lone range has no hole;
        a number of that publisher arriving later starts it afresh, and numbers before the first
        seen are never counted). Publishers with holes stay: they carry the count. Returns the rows
        deleted (at most 10,000 a time)."""
        from django.db.models import Count
        from django.utils import timezone

        from mqttd.django.models import PublisherRange

        cutoff = timezone.now() - self.PRUNE_AFTER
        whole = (PublisherRange.objects.filter(project=self.project).values("pub")
                 .annotate(n=Count("id")).filter(n=1).values("pub"))
        # Ids first, then the delete: MySQL refuses a DELETE whose subquery reads the same table.
        ids = list(PublisherRange.objects.filter(project=self.project, last_seen_at__lt=cutoff, pub__in=whole)
                   .values_list("id", flat=True)[:10_000])
        if ids:
            PublisherRange.objects.filter(id__in=ids).delete()
            log.info("gap detection: forgot %d publisher id(s) silent for over %d days with nothing missing",
                     len(ids), self.PRUNE_AFTER.days)
        return len(ids)

    def _prune_if_due(self) -> None:
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + self.PRUNE_EVERY_S
        try:
            self.prune()
        except Exception as exc:  # noqa: BLE001 - housekeeping: try again in an hour
            log.warning("gap detection: cannot prune old publisher ranges: %s", exc)
            from django.db import connection

            connection.close_if_unusable_or_obsolete()

    def start(self, every: float) -> None:
        """Count in a thread of its own (a slow database must not hold up the main loop's
        watchdog), never more often than every ``every`` s. ``stop()`` ends it."""

        def loop() -> None:
            from django.db import connection

            try:
                while True:
                    self._wake.clear()
                    began = time.monotonic()
                    self.refresh()
                    self._prune_if_due()
                    # asleep until a commit, the next due count, or stop() (which also sets _wake)
                    self._wake.wait(max(0.0, self._next_due - time.monotonic()))
                    if self._stop.wait(max(0.0, began + every - time.monotonic())):
                        return
            finally:
                connection.close()

        threading.Thread(target=loop, name="mqttd-gaps", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


def detection_state(use_model: bool) -> str | None:
    """None when gap detection can run, else why it is off (shown by status)."""
    if not use_model:
        return "off: the mqttd app is not installed (dead letters go to a file)"
    from django.db import connection

    from mqttd.django.models import PublisherRange

    try:
        with connection.cursor() as cursor:
            tables = connection.introspection.table_names(cursor)
    except Exception as exc:  # noqa: BLE001 - the database is down at start-up: try with the table
        log.warning("cannot check for the gap-detection table (%s): assuming it exists", exc)
        return None
    finally:
        connection.close()
    if PublisherRange._meta.db_table not in tables:
        return "off: migration mqttd 0003 not applied (run `manage.py migrate mqttd`)"
    return None
