"""``python manage.py mqttd``: the same daemon, started from inside a tenant's Django project."""
from __future__ import annotations

import os

from django.core.management.base import BaseCommand, CommandError

from mqttd.errors import MqttdError


class Command(BaseCommand):
    help = "Run the mqttd ingestion daemon for this project (same options as `mqttd run`)."

    def add_arguments(self, parser) -> None:  # noqa: ANN001
        parser.add_argument("--project")
        parser.add_argument("--instance")
        parser.add_argument("--config")
        parser.add_argument("--log-level", default="INFO")

    def handle(self, *args, **opts) -> None:  # noqa: ANN002, ANN003
        from mqttd import daemon
        from mqttd.config import config_path, load
        from mqttd.identity import from_args

        try:
            identity = from_args(opts["project"], opts["instance"], os.environ)
            config = load(config_path(opts["config"], identity, os.environ), os.environ)
            code = daemon.run(identity, config, setup_django=False, log_level=opts["log_level"])
        except MqttdError as exc:
            raise CommandError(str(exc), returncode=exc.exit_code) from None
        if code:
            raise CommandError(f"mqttd exited {code}", returncode=code)
