"""Bring up the tenant's Django project inside this process (once, after any fork)."""
from __future__ import annotations

import os
import sys

from mqttd.config import Config
from mqttd.daemon import logs
from mqttd.errors import ConfigError


def setup(config: Config) -> None:
    """Prepend ``django.pythonpath``, choose the settings module, ``django.setup()``."""
    file = str(config.path) if config.path else None
    for entry in reversed(config.django.pythonpath):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if config.django.settings:
        os.environ["DJANGO_SETTINGS_MODULE"] = config.django.settings
    elif not os.environ.get("DJANGO_SETTINGS_MODULE"):
        raise ConfigError("is required (or set DJANGO_SETTINGS_MODULE)", file=file, key="django.settings")
    import django
    from django.core.exceptions import ImproperlyConfigured

    try:
        django.setup()
    except ImportError as exc:
        raise ConfigError(f"cannot import settings {os.environ['DJANGO_SETTINGS_MODULE']!r}: {exc}",
                          file=file, key="django.settings") from None
    except ImproperlyConfigured as exc:
        raise ConfigError(f"Django settings are not usable: {exc}", file=file, key="django.settings") from None
    logs.reattach()
