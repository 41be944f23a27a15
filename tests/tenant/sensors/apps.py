from django.apps import AppConfig


class SensorsConfig(AppConfig):
    name = "sensors"
