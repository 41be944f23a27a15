from django.apps import AppConfig


class MqttdConfig(AppConfig):
    """Registers the models and admin; ``ready()`` has no side effects (routes are discovered by
    the daemon at start-up, not here)."""

    name = "mqttd.django"
    label = "mqttd"
    verbose_name = "MQTT ingestion (mqttd)"
    default_auto_field = "django.db.models.BigAutoField"
