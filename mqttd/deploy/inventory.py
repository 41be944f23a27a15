"""The deployment inventory: which projects run on this host, and how (docs/deployment.md).

``load_inventory`` parses and validates the TOML structure and refuses any two projects that
would share a name, a lock, a client ID or a log dir (every derived name comes from
``mqttd.identity``, the same code the daemon uses). ``Inventory.check_host`` then checks the
things that live on this machine: the venv's ``bin/mqttd``, the config file (validated with the
daemon's own loader), the working directory and the user. ``mqttd status --inventory`` needs
only the first step, so a broken venv never hides the other projects' status.
"""
from __future__ import annotations

import os
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from mqttd import config as config_mod
from mqttd.errors import ConfigError, DeployError, MqttdError
from mqttd.identity import DEFAULT_LOG_DIR, DEFAULT_RUN_DIR, NAME_RULE, Identity, derive, validate_name
from mqttd.tables import TableReader

PROJECT_KEYS = ("name", "venv", "directory", "config", "user", "numprocs", "environment", "log_dir", "run_dir")
MAX_NUMPROCS = 64
_NAME_RE = re.compile(NAME_RULE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by deploy from the inventory's own keys; an `environment` entry would fight with them.
RESERVED_ENV = ("MQTTD_PROJECT", "MQTTD_INSTANCE", "MQTTD_CONFIG", "MQTTD_RUN_DIR", "MQTTD_LOG_DIR")
# Generated Supervisor files are world-readable (0644, like the rest of conf.d), so anything that
# looks like a credential is refused (secrets never go in generated configs).
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|(^|_)KEY$|PRIVATE", re.IGNORECASE)


@dataclass(frozen=True)
class Project:
    """One tenant project as the inventory describes it (defaults already applied)."""

    name: str
    venv: Path
    config: Path
    user: str
    directory: Path | None = None
    numprocs: int = 1
    environment: tuple[tuple[str, str], ...] = ()
    log_dir: Path = Path(DEFAULT_LOG_DIR)
    run_dir: Path = Path(DEFAULT_RUN_DIR)

    @property
    def program(self) -> str:
        """The Supervisor program (and group) name: ``bnp-mqtt``."""
        return f"{self.name}-mqtt"

    @property
    def command(self) -> Path:
        return self.venv / "bin" / "mqttd"

    @property
    def supervisor_log_dir(self) -> Path:
        """Where Supervisor's capture of stdout/stderr goes: LOG_ROOT/NAME/ for every instance."""
        return self.log_dir / self.name

    def instances(self) -> list[int | None]:
        return [None] if self.numprocs == 1 else list(range(self.numprocs))

    def identities(self, env: Mapping[str, str] | None = None, hostname: str | None = None) -> list[Identity]:
        env = {**(env or {}), "MQTTD_RUN_DIR": str(self.run_dir), "MQTTD_LOG_DIR": str(self.log_dir)}
        return [derive(self.name, i, env, hostname) for i in self.instances()]


@dataclass(frozen=True)
class Inventory:
    path: Path
    projects: tuple[Project, ...]

    def identities(self, env: Mapping[str, str] | None = None) -> list[Identity]:
        """One Identity per instance of every project (what `status --inventory` lists)."""
        return [ident for p in self.projects for ident in p.identities(env)]

    def check_host(self, env: Mapping[str, str] | None = None) -> None:
        """Check what lives on this machine, then the client IDs (a config may set its own)."""
        env = os.environ if env is None else env
        client_ids: dict[int, list[str]] = {}
        for index, p in enumerate(self.projects):
            client_ids[index] = _check_project_on_host(self.path, p, env)
        _refuse_shared(self.path, self.projects, lambda i, p: client_ids[i], "client ID")
        _refuse_mixed_owners(self.path, self.projects)


def _where(file: Path, label: str, key: str | None = None) -> dict[str, str]:
    return {"file": str(file), "key": f"project[{label}]" + (f".{key}" if key else "")}


def _check_project_on_host(file: Path, p: Project, env: Mapping[str, str]) -> list[str]:
    """Filesystem and user checks for one project; returns the client IDs its instances use."""
    if not (p.command.is_file() and os.access(p.command, os.X_OK)):
        raise ConfigError(f"no executable bin/mqttd in {p.venv} (pip install django-mqttd into this venv)",
                          **_where(file, p.name, "venv"))
    if p.directory is not None and not p.directory.is_dir():
        raise ConfigError(f"directory {p.directory} does not exist", **_where(file, p.name, "directory"))
    try:
        pwd.getpwnam(p.user)
    except KeyError:
        raise ConfigError(f"no such user {p.user!r} on this host", **_where(file, p.name, "user")) from None
    if not p.config.is_file():
        raise ConfigError(f"config file {p.config} not found", **_where(file, p.name, "config"))
    try:
        cfg = config_mod.load(p.config, {**env, **dict(p.environment)})
    except MqttdError as exc:
        raise ConfigError(str(exc), **_where(file, p.name, "config")) from None
    explicit = cfg.broker.client_id
    if explicit and p.numprocs > 1:
        raise ConfigError(f"{p.numprocs} processes would share broker.client_id {explicit!r} from {p.config} "
                          "and take each other's session over; remove it so each instance derives its own",
                          **_where(file, p.name, "numprocs"))
    return [explicit or ident.client_id for ident in p.identities(env)]


def _refuse_shared(file: Path, projects: tuple[Project, ...], values, what: str) -> None:
    """DeployError naming both projects if two of them would share one of ``values(i, p)``."""
    seen: dict[str, int] = {}
    for i, p in enumerate(projects):
        for value in values(i, p):
            first = seen.setdefault(str(value), i)
            if first != i:
                raise DeployError(f"{file}: projects {projects[first].name!r} and {p.name!r} would share "
                                  f"the {what} {value}")


def _refuse_mixed_owners(file: Path, projects: tuple[Project, ...]) -> None:
    """All lock and status files of a run dir sit side by side, so its projects need one user."""
    owners: dict[Path, tuple[str, str]] = {}
    for p in projects:
        first = owners.setdefault(p.run_dir, (p.name, p.user))
        if first[1] != p.user:
            raise DeployError(f"{file}: run_dir {p.run_dir} is shared by {first[0]!r} (user {first[1]}) and "
                              f"{p.name!r} (user {p.user}); give each user its own run_dir")


class _Table(TableReader):
    """One inventory table (``[defaults]`` or a ``[[project]]``): errors name the file and
    ``defaults.KEY`` or ``project[NAME].KEY`` (``mqttd.tables``). Values are read, not taken:
    a project's table is read merged with the defaults."""

    def __init__(self, file: Path, label: str, table: Mapping[str, Any]) -> None:
        super().__init__(str(file), "defaults" if label == "defaults" else f"project[{label}]", table)
        self.label = label

    def unknown(self) -> None:
        key = self.first_unknown(PROJECT_KEYS)
        if key is not None:
            raise self.error(key, f"unknown key (known: {', '.join(PROJECT_KEYS)})")

    @overload
    def text(self, key: str, required: Literal[True] = ...) -> str: ...
    @overload
    def text(self, key: str, required: bool) -> str | None: ...

    def text(self, key: str, required: bool = True) -> str | None:
        value = self.table.get(key)
        if value is None:
            if required:
                raise self.error(key, "is required (in the project or in [defaults])")
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, not {value!r}")
        if any(ord(c) < 32 or ord(c) == 127 for c in value) or value != value.strip():
            raise self.error(key, f"must not contain control characters or surrounding spaces: {value!r}")
        return value

    @overload
    def path(self, key: str, required: Literal[True] = ..., default: str | None = ...) -> Path: ...
    @overload
    def path(self, key: str, required: bool, default: str | None = ...) -> Path | None: ...

    def path(self, key: str, required: bool = True, default: str | None = None) -> Path | None:
        value = self.text(key, required and default is None)
        if value is None:
            return Path(default) if default else None
        if not os.path.isabs(value):
            raise self.error(key, f"must be an absolute path, not {value!r}")
        return Path(os.path.normpath(value))

    def numprocs(self) -> int:
        value = self.table.get("numprocs", 1)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NUMPROCS:
            raise self.error("numprocs", f"must be a whole number from 1 to {MAX_NUMPROCS}, not {value!r}")
        return value

    def environment(self, inherited: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        table = self.table.get("environment", {})
        if not isinstance(table, dict):
            raise self.error("environment", "must be a table of NAME = \"value\"")
        merged = dict(inherited)
        for name, value in table.items():
            key = f"environment.{name}"
            if not _ENV_NAME.fullmatch(name):
                raise self.error(key, "is not a valid variable name")
            if name in RESERVED_ENV or name.startswith("SUPERVISOR_"):
                raise self.error(key, "is set by mqttd deploy itself (use the inventory's own keys)")
            if _SECRET_NAME.search(name):
                raise self.error(key, "looks like a secret, and generated Supervisor files are world-readable: "
                                      "use the config's password_file or the tenant's own settings")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise self.error(key, f"must be a string or a number, not {value!r}")
            value = str(value)
            if any(ord(c) < 32 or ord(c) == 127 for c in value) or '"' in value:
                raise self.error(key, "must not contain control characters or double quotes")
            if value[:1] == "'" or value[-1:] == "'":
                raise self.error(key, "must not begin or end with a single quote (Supervisor strips them)")
            merged[name] = value
        return tuple(merged.items())


def _project(file: Path, index: int, raw: Any, defaults: Mapping[str, Any],
             default_env: Mapping[str, str]) -> Project:
    if not isinstance(raw, dict):
        raise ConfigError("must be a table ([[project]])", file=str(file), key=f"project[{index}]")
    name = raw.get("name")
    label = name if isinstance(name, str) and _NAME_RE.fullmatch(name) else str(index)
    t = _Table(file, label, {**defaults, **raw})
    _Table(file, label, raw).unknown()
    name = t.text("name")
    try:
        validate_name(name)
    except MqttdError as exc:
        raise t.error("name", str(exc)) from None
    return Project(
        name=name,
        venv=t.path("venv"),
        config=t.path("config", default=f"{config_mod.DEFAULT_CONFIG_DIR}/{name}.toml"),
        user=t.text("user"),
        directory=t.path("directory", required=False),
        numprocs=t.numprocs(),
        environment=t.environment(default_env),
        log_dir=t.path("log_dir", default=DEFAULT_LOG_DIR),
        run_dir=t.path("run_dir", default=DEFAULT_RUN_DIR),
    )


def parse(data: Mapping[str, Any], file: Path) -> Inventory:
    """Validate an already-parsed inventory document (no filesystem checks)."""
    for key in data:
        if key not in ("defaults", "project"):
            raise ConfigError("unknown key (an inventory has [defaults] and [[project]] tables)",
                              file=str(file), key=key)
    raw_defaults = data.get("defaults", {})
    if not isinstance(raw_defaults, dict):
        raise ConfigError("must be a table", file=str(file), key="defaults")
    d = _Table(file, "defaults", raw_defaults)
    d.unknown()
    if "name" in raw_defaults:
        raise d.error("name", "belongs in each [[project]], not in [defaults]")
    default_env = dict(d.environment({}))
    defaults = {k: v for k, v in raw_defaults.items() if k != "environment"}
    raw_projects = data.get("project", [])
    if not isinstance(raw_projects, list) or not raw_projects:
        raise ConfigError("no [[project]] tables: list at least one project", file=str(file), key="project")
    projects = tuple(_project(file, i, raw, defaults, default_env) for i, raw in enumerate(raw_projects))
    _refuse_shared(file, projects, lambda i, p: [p.name], "name")
    _refuse_shared(file, projects, lambda i, p: [p.program], "Supervisor program")
    _refuse_shared(file, projects, lambda i, p: [x.lock_path for x in p.identities()], "lock")
    _refuse_shared(file, projects, lambda i, p: {x.log_dir for x in p.identities()} | {p.supervisor_log_dir},
                   "log dir")
    _refuse_shared(file, projects, lambda i, p: [x.client_id for x in p.identities()], "client ID")
    return Inventory(path=file, projects=projects)


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate the inventory at ``path``; errors name the file, project and key."""
    file = Path(path)
    return parse(config_mod.read_toml(file, missing="inventory file not found"), file)
