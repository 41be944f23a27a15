from django.db import models


class InboxMessage(models.Model):
    """Raw messages stored by the built-in ``mqttd.inbox`` handler."""

    topic = models.CharField(max_length=1024, db_index=True)
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

    topic = models.CharField(max_length=1024, db_index=True)
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
