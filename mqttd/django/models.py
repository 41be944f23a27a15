from django.db import models


class InboxMessage(models.Model):
    """Raw messages stored by the built-in ``mqttd.inbox`` handler."""

    # Text, not a CharField: MQTT allows topics of up to 65,535 bytes. (A topic too long for the
    # index, ~2,700 bytes on PostgreSQL, fails its insert and becomes a dead letter.)
    topic = models.TextField(db_index=True)
    payload = models.BinaryField()
    qos = models.PositiveSmallIntegerField(default=1)
    retain = models.BooleanField(default=False)
    received_at = models.DateTimeField(db_index=True)

    class Meta:
        app_label = "mqttd"
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.topic} ({len(self.payload)} B)"


class DeadLetter(models.Model):
    """A message whose handler raised (or whose payload did not decode). It was acked to the
    broker only after this row committed; ``mqttd replay`` runs it again."""

    # Any topic MQTT allows (up to 65,535 bytes): text, and no index that a long topic could overflow.
    topic = models.TextField()
    payload = models.BinaryField()
    route = models.CharField(max_length=255, blank=True, default="")
    qos = models.PositiveSmallIntegerField(default=1)
    properties = models.JSONField(default=dict, blank=True)
    error = models.TextField()
    traceback = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "mqttd"
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.topic}: {self.error[:80]}"


class ProcessedKey(models.Model):
    """Dedupe keys of handled messages, written in the same transaction as the handler's rows."""

    route = models.CharField(max_length=255)
    key = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        app_label = "mqttd"
        constraints = [models.UniqueConstraint(fields=["route", "key"], name="mqttd_processedkey_route_key")]

    def __str__(self) -> str:
        return f"{self.route}: {self.key}"


class PublisherRange(models.Model):
    """Gap detection (docs/operations.md, ``mqttd.ingest.gaps``): the ``mqttd-seq`` numbers of one publisher id
    that arrived, as ranges ``first..last``; a hole between two ranges is a gap. Written in the batch
    transaction, shared by every instance of the project through the tenant database."""

    project = models.CharField(max_length=255)
    pub = models.CharField(max_length=255)
    first = models.BigIntegerField()
    last = models.BigIntegerField()
    # When the lowest number of this range first arrived: the hole before it has been open since.
    first_seen_at = models.DateTimeField()
    # When a number last joined this range: a publisher silent for long, with nothing missing, is
    # forgotten (``GapCounter.prune``), so the table does not grow with every publishing process.
    last_seen_at = models.DateTimeField()

    class Meta:
        app_label = "mqttd"
        indexes = [models.Index(fields=["project", "pub", "first"], name="mqttd_pubrange_pub_first")]

    def __str__(self) -> str:
        return f"{self.pub}: {self.first}..{self.last}"
