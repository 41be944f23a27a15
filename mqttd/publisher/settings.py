"""Where the tenant's publisher connects and what it calls itself: the ``broker`` given, else the
daemon's TOML (``MQTTD_CONFIG``, or ``/etc/mqttd/PROJECT.toml``), else Django's
``settings.MQTTD_PUBLISHER``. No paho here.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqttd.config import BrokerConfig, config_path, load, parse_broker
from mqttd.errors import ConfigError
from mqttd.identity import derive, validate_name

DEFAULT_TIMEOUT = 10.0
SETTINGS_NAME = "MQTTD_PUBLISHER"

@dataclass(frozen=True)
class PublisherSettings:
    """Where a publisher connects and what it calls itself."""

    broker: BrokerConfig
    project: str
    timeout: float = DEFAULT_TIMEOUT
    source: str = "arguments"


def resolve(broker: BrokerConfig | None = None, project: str | None = None,
            env: Mapping[str, str] | None = None) -> PublisherSettings:
    """The ``broker`` given, else the daemon's TOML (``MQTTD_CONFIG``, or ``/etc/mqttd/PROJECT.toml``
    with PROJECT from ``MQTTD_PROJECT``), else Django's ``settings.MQTTD_PUBLISHER``."""
    env = os.environ if env is None else env
    given = project
    project = project or env.get("MQTTD_PROJECT") or env.get("PROJECT_NAME")
    if broker is not None:
        return PublisherSettings(broker, _need_project(project, "arguments"))
    tried = []
    explicit = env.get("MQTTD_CONFIG")
    if explicit or project:
        path = Path(explicit) if explicit else config_path(None, derive(validate_name(project or "")), env)
        if explicit or path.exists():
            return PublisherSettings(load(path, env).broker, _need_project(project, str(path)), source=str(path))
        tried.append(str(path))
    table = _django_settings()
    if table is not None:
        return _from_django(table, given, env)
    tried.append(f"Django settings.{SETTINGS_NAME}")
    raise ConfigError(f"no broker configuration for the publisher (tried MQTTD_CONFIG, {', '.join(tried)}); "
                      "set MQTTD_CONFIG, MQTTD_PROJECT or settings.MQTTD_PUBLISHER", key="publisher")


def _need_project(project: str | None, source: str) -> str:
    if not project:
        raise ConfigError("no project name for the publisher's client id: pass project=, set MQTTD_PROJECT, "
                          f'or add "project" to settings.{SETTINGS_NAME}', file=source)
    return validate_name(project)


def _django_settings() -> Mapping[str, Any] | None:
    """settings.MQTTD_PUBLISHER when Django is configured; Django is never imported otherwise."""
    if "django" not in sys.modules and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return None
    try:
        from django.conf import settings
    except ImportError:
        return None
    if not (settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE")):
        return None
    return getattr(settings, SETTINGS_NAME, None)   # a broken settings module raises here, as it should


def _from_django(table: Any, project: str | None, env: Mapping[str, str]) -> PublisherSettings:
    """Project name: ``project`` (the caller's), else the table's "project", else MQTTD_PROJECT."""
    source = f"settings.{SETTINGS_NAME}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"must be a dict, not {type(table).__name__}", file="Django settings", key=SETTINGS_NAME)
    table = dict(table)
    project = project or table.pop("project", None) or env.get("MQTTD_PROJECT") or env.get("PROJECT_NAME")
    table.pop("project", None)
    timeout = table.pop("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"must be a positive number of seconds, not {timeout!r}", file="Django settings",
                          key=f"{SETTINGS_NAME}.timeout")
    broker = parse_broker(table, "Django settings", SETTINGS_NAME, env)
    return PublisherSettings(broker, _need_project(project, source), float(timeout), source)
