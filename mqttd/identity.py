"""Project name -> every name an instance owns. Pure: no I/O, no globals.

Everything an instance owns (lock, client id, log dir, status file, topics) is derived here from
the project name and instance number, so two projects can never collide on any of them.
"""
from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mqttd.errors import InvalidName, UsageError

NAME_RULE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_NAME_RE = re.compile(NAME_RULE)
DEFAULT_RUN_DIR = "/run/mqttd"
DEFAULT_LOG_DIR = "/var/log/mqttd"


def validate_name(name: str) -> str:
    """Return ``name`` if it follows the rule, else raise InvalidName showing the rule."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid project name {name!r}: it must match {NAME_RULE} "
            "(lower-case letters, digits, '_' and '-', starting with a letter or digit, at most 63)"
        )
    return name


def validate_instance(value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    text = str(value)
    if not text.isdigit() or len(text) > 4:
        raise UsageError(f"invalid instance number {value!r}: it must be a whole number 0-9999")
    return int(text)


def short_hostname() -> str:
    return socket.gethostname().split(".", 1)[0] or "localhost"


@dataclass(frozen=True)
class Identity:
    """The names derived from one (project, instance) pair on one host."""

    project: str
    instance: int | None
    run_dir: Path
    log_root: Path
    hostname: str

    @property
    def name(self) -> str:
        """The project part of every derived name: ``bnp`` or ``bnp-2``."""
        return self.project if self.instance is None else f"{self.project}-{self.instance}"

    @property
    def lock_path(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def status_path(self) -> Path:
        return self.run_dir / f"{self.name}.status.json"

    @property
    def subscriptions_path(self) -> Path:
        """The filters last subscribed, kept to unsubscribe removed ones from a resumed session."""
        return self.run_dir / f"{self.name}.subscriptions.json"

    @property
    def log_dir(self) -> Path:
        return self.log_root / self.name

    @property
    def log_file(self) -> Path:
        return self.log_dir / "mqttd.log"

    @property
    def deadletter_file(self) -> Path:
        return self.log_dir / "deadletter.jsonl"

    @property
    def client_id(self) -> str:
        return f"{self.name}-{self.hostname}"

    @property
    def status_topic(self) -> str:
        return f"mqttd/{self.name}/status"

    @property
    def canary_topic(self) -> str:
        return f"mqttd/{self.name}/canary"

    def owner_topic(self, client_id: str) -> str:
        """Retained ``host:pid:start`` of the process using ``client_id``: evidence of a twin.

        Per client id, not per name: the same project on several hosts (docs/deployment.md, 'Scale-out') has one name
        and several client ids, and those are not twins."""
        return f"mqttd/{self.name}/owner/{re.sub(r'[^A-Za-z0-9_.-]', '_', client_id)}"


def resolve_project(arg: str | None, env: Mapping[str, str]) -> str:
    """--project, else MQTTD_PROJECT, else PROJECT_NAME."""
    for value in (arg, env.get("MQTTD_PROJECT"), env.get("PROJECT_NAME")):
        if value is not None:
            return validate_name(value)
    raise UsageError("no project name: pass --project NAME or set MQTTD_PROJECT")


def derive(
    project: str,
    instance: int | None = None,
    env: Mapping[str, str] | None = None,
    hostname: str | None = None,
) -> Identity:
    env = env or {}
    return Identity(
        project=validate_name(project),
        instance=instance,
        run_dir=Path(env.get("MQTTD_RUN_DIR") or DEFAULT_RUN_DIR),
        log_root=Path(env.get("MQTTD_LOG_DIR") or DEFAULT_LOG_DIR),
        hostname=hostname or short_hostname(),
    )


def from_args(project: str | None, instance: str | int | None, env: Mapping[str, str]) -> Identity:
    """Identity from command-line values falling back to the environment."""
    name = resolve_project(project, env)
    inst = validate_instance(instance if instance is not None else env.get("MQTTD_INSTANCE"))
    return derive(name, inst, env)
