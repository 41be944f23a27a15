from django.db import models


class Reading(models.Model):
    device = models.CharField(max_length=64, db_index=True)
    seq = models.BigIntegerField()
    rssi = models.IntegerField(null=True)
    temp = models.FloatField(null=True)
    source = models.CharField(max_length=16, default="single")
    received_at = models.DateTimeField(auto_now_add=True)


class Strict(models.Model):
    """A model with a constraint, to show a violation becoming a dead letter."""

    code = models.CharField(max_length=32, unique=True)


class Sample(models.Model):
    """Filled by model routes (``[[subscribe]] model = "sensors.Sample"``), without handler code."""

    device = models.CharField(max_length=16)
    seq = models.BigIntegerField()
    rssi = models.IntegerField(null=True)
    temp = models.FloatField(null=True)
    topic = models.CharField(max_length=255, blank=True)
    extra = models.JSONField(null=True)
    code = models.CharField(max_length=32, null=True, unique=True)   # a value the database refuses twice
    received_at = models.DateTimeField(null=True)
    stored_at = models.DateTimeField(auto_now_add=True)
