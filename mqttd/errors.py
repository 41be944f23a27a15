"""Every expected failure of mqttd is one of these classes, and each knows its exit code.

The CLI maps an ``MqttdError`` to ``exit_code`` and prints ``str(error)`` on one line; nothing
else in the package calls ``sys.exit``. Codes follow sysexits(3) where one fits. Every exit code
of the package is one of the names below (no literal elsewhere).
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1            # generic failure (one line on stderr)
EXIT_UNHEALTHY = 1          # `mqttd health` / `status`: unhealthy
EXIT_USAGE = 2              # bad arguments or an invalid project name
EXIT_SOFTWARE = 70          # internal failure the watchdog caught (EX_SOFTWARE)
EXIT_TAKEOVER = 73          # another client keeps taking our client id (EX_CANTCREAT)
EXIT_LOCKED = 75            # another instance holds the lock (EX_TEMPFAIL)
EXIT_CONFIG = 78            # configuration error (EX_CONFIG)
EXIT_SIGNAL_BASE = 128      # killed by signal N: 128 + N (a second SIGTERM exits at once with this)
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + 2     # Ctrl-C (SIGINT) outside the daemon


class MqttdError(Exception):
    """Root of all expected errors. ``str()`` is the one-line message the user sees."""

    exit_code = EXIT_FAILURE


class UsageError(MqttdError):
    exit_code = EXIT_USAGE


class InvalidName(UsageError):
    """A project name (or instance number) that breaks the naming rule."""


class ConfigError(MqttdError):
    """Configuration file, key or value is wrong. Message names file, key and reason."""

    exit_code = EXIT_CONFIG

    def __init__(self, reason: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file, self.key, self.reason = file, key, reason
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {reason}" if where else reason)


class BrokerAuthError(ConfigError):
    """The broker refused our credentials on the first connect."""


class LockHeld(MqttdError):
    """Another process holds this project's lock."""

    exit_code = EXIT_LOCKED

    def __init__(self, name: str, path: str, pid: int | None) -> None:
        self.name, self.path, self.pid = name, path, pid
        who = f"pid {pid}" if pid else "an unknown pid"
        super().__init__(f"mqttd[{name}]: already running as {who} (lock {path})")


class WatchdogTripped(MqttdError):
    """The network thread died or the connection stopped moving packets."""

    exit_code = EXIT_SOFTWARE


class TakeoverDetected(MqttdError):
    """Another client keeps connecting with our client id."""

    exit_code = EXIT_TAKEOVER


class DeployError(MqttdError):
    """An inventory or Supervisor problem found by `deploy` or `recover`."""

    exit_code = EXIT_FAILURE


class SupervisorError(DeployError):
    """supervisord refused a call or could not be reached. ``fault`` is the XML-RPC fault name
    (``BAD_NAME``, ``SPAWN_ERROR``, ``NOT_RUNNING`` ...) or None for a connection problem."""

    def __init__(self, message: str, fault: str | None = None) -> None:
        self.fault = fault
        super().__init__(message)


class HandlerContractError(MqttdError):
    """A handler left the batch transaction unusable (swallowed a database error, closed the
    connection, committed or rolled back itself). Its message becomes a dead letter with this
    error; ``lost`` says the whole transaction is gone, so the batch runs again without it."""

    def __init__(self, message: str, *, lost: bool = False) -> None:
        self.lost = lost
        super().__init__(message)


class PublishError(MqttdError):
    """A publish was not confirmed by the broker within its timeout."""

    exit_code = EXIT_FAILURE
