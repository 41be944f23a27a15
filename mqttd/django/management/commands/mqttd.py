"""``python manage.py mqttd``: the same daemon, started from inside a tenant's Django project.

Its options are ``mqttd run``'s, added by the very function that builds ``mqttd run``
(``mqttd.cli.add_run_arguments``), and it runs through ``mqttd.cli.run_daemon``, which loads the
identity and config as ``mqttd run`` does: the two cannot drift apart. What differs: Django is set up
already (by ``manage.py``), so the daemon does not set it up again.
"""
from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from mqttd.errors import MqttdError


class Command(BaseCommand):
    help = ("Run the mqttd ingestion daemon for this project (the options of `mqttd run`; "
            "`mqttd run --help` describes them).")

    def add_arguments(self, parser) -> None:  # noqa: ANN001
        from mqttd.cli import add_run_arguments

        add_run_arguments(parser)

    def handle(self, *args, **opts) -> None:  # noqa: ANN002, ANN003
        from mqttd.cli import run_daemon

        try:
            code = run_daemon(opts, setup_django=False)      # identity, config, --daemonize: as `mqttd run`
        except MqttdError as exc:
            raise CommandError(str(exc), returncode=exc.exit_code) from None
        if code:
            raise CommandError(f"mqttd exited {code}", returncode=code)
