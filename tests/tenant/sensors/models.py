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
