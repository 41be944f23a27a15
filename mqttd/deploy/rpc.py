"""A thin client for supervisord's XML-RPC interface (used by ``deploy --apply`` and ``recover``).

Supervisor is reached at ``--supervisor-url``, else ``$SUPERVISOR_SERVER_URL``, else
``unix:///var/run/supervisor.sock``; ``unix://`` and ``http://`` both go through
Supervisor's own ``SupervisorTransport``. Credentials for an ``http://`` server with a password
come from ``$SUPERVISOR_USERNAME`` / ``$SUPERVISOR_PASSWORD`` (the names Supervisor's own
``childutils`` reads), never from the URL or the command line.

Every failure becomes a one-line ``SupervisorError`` whose ``fault`` is Supervisor's fault name
(``BAD_NAME``, ``SPAWN_ERROR``, ``ALREADY_STARTED``, ``NOT_RUNNING`` ...), or None when
supervisord could not be reached at all.
"""
from __future__ import annotations

import http.client
import xmlrpc.client
from collections.abc import Mapping
from typing import Any

from mqttd.errors import SupervisorError

DEFAULT_URL = "unix:///var/run/supervisor.sock"

# Supervisor's fault codes (supervisor.xmlrpc.Faults), named here so that importing this module
# does not pull in supervisor until a call is made.
FAULTS = {1: "UNKNOWN_METHOD", 2: "INCORRECT_PARAMETERS", 3: "BAD_ARGUMENTS", 4: "SIGNATURE_UNSUPPORTED",
          6: "SHUTDOWN_STATE", 10: "BAD_NAME", 11: "BAD_SIGNAL", 20: "NO_FILE", 21: "NOT_EXECUTABLE",
          30: "FAILED", 40: "ABNORMAL_TERMINATION", 50: "SPAWN_ERROR", 60: "ALREADY_STARTED",
          70: "NOT_RUNNING", 80: "SUCCESS", 90: "ALREADY_ADDED", 91: "STILL_RUNNING", 92: "CANT_REREAD"}
_HINTS = {
    "UNKNOWN_METHOD": " (is [rpcinterface:supervisor] in supervisord.conf?)",
    "SPAWN_ERROR": " (see `supervisorctl tail NAME` and the program's log)",
    "CANT_REREAD": " (supervisord cannot parse its configuration)",
}


def resolve_url(arg: str | None, env: Mapping[str, str]) -> str:
    url = arg or env.get("SUPERVISOR_SERVER_URL") or DEFAULT_URL
    if not url.startswith(("unix://", "http://")):
        raise SupervisorError(f"supervisor URL {url!r} must start with unix:// or http://")
    if "@" in url.split("//", 1)[1].split("/", 1)[0]:
        raise SupervisorError("supervisor URL must not hold credentials: set SUPERVISOR_USERNAME and "
                              "SUPERVISOR_PASSWORD in the environment instead")
    return url


class Supervisor:
    """One supervisord, called over XML-RPC."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None) -> None:
        from supervisor.xmlrpc import SupervisorTransport

        self.url = url
        transport = SupervisorTransport(username, password, url)
        # The host part is ignored for unix sockets; for http it is the server itself.
        self._proxy = xmlrpc.client.ServerProxy("http://127.0.0.1" if url.startswith("unix://") else url,
                                                transport=transport, allow_none=True)

    @classmethod
    def from_args(cls, url_arg: str | None, env: Mapping[str, str]) -> Supervisor:
        return cls(resolve_url(url_arg, env), env.get("SUPERVISOR_USERNAME") or None,
                   env.get("SUPERVISOR_PASSWORD") or None)

    def call(self, method: str, *args: Any, what: str = "") -> Any:
        """``supervisor.METHOD(*args)``; every failure is a one-line SupervisorError."""
        action = what or f"{method}({', '.join(map(repr, args))})"
        try:
            return getattr(self._proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            name = FAULTS.get(fault.faultCode, str(fault.faultCode))
            text = fault.faultString.splitlines()[0] if fault.faultString else name
            raise SupervisorError(f"supervisord: {action}: {text}{_HINTS.get(name, '')}", fault=name) from None
        except xmlrpc.client.ProtocolError as exc:
            hint = " (set SUPERVISOR_USERNAME and SUPERVISOR_PASSWORD)" if exc.errcode == 401 else ""
            status = f"HTTP {exc.errcode} {exc.errmsg}"
            raise SupervisorError(f"supervisord at {self.url}: {action}: {status}{hint}") from None
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise SupervisorError(f"cannot reach supervisord at {self.url}: {reason} "
                                  "(is it running? use --supervisor-url or SUPERVISOR_SERVER_URL)") from None

    # ---- configuration ------------------------------------------------------------------------------
    def reload_config(self) -> tuple[list[str], list[str], list[str]]:
        """Reread the configuration files: (added, changed, removed) group names. Starts nothing."""
        [[added, changed, removed]] = self.call("reloadConfig", what="reread configuration")
        return list(added), list(changed), list(removed)

    def add_group(self, name: str) -> None:
        self.call("addProcessGroup", name, what=f"add {name}")

    def remove_group(self, name: str) -> None:
        self.call("removeProcessGroup", name, what=f"remove {name}")

    def get_all_config_info(self) -> list[dict[str, Any]]:
        return self.call("getAllConfigInfo", what="read configuration")

    # ---- processes ----------------------------------------------------------------------------------
    def _group_results(self, results: list[dict[str, Any]], action: str) -> None:
        bad = [r for r in results if r.get("status") != 80]
        if bad:
            r = bad[0]
            raise SupervisorError(f"supervisord: {action} {r['group']}:{r['name']}: {r.get('description')}",
                                  fault=FAULTS.get(r.get("status", -1), str(r.get("status"))))

    def stop_group(self, name: str, wait: bool = True) -> None:
        """Stop every running process of a group (a stopped one is left as it is)."""
        self._group_results(self.call("stopProcessGroup", name, wait, what=f"stop {name}"), "stop")

    def start_group(self, name: str, wait: bool = True) -> None:
        self._group_results(self.call("startProcessGroup", name, wait, what=f"start {name}"), "start")

    def stop_process(self, name: str, wait: bool = True) -> None:
        """``name`` is ``group:process`` (or the bare name of a one-process group)."""
        self.call("stopProcess", name, wait, what=f"stop {name}")

    def start_process(self, name: str, wait: bool = True) -> None:
        self.call("startProcess", name, wait, what=f"start {name}")

    def get_process_info(self, name: str) -> dict[str, Any]:
        return self.call("getProcessInfo", name, what=f"get state of {name}")

    def get_all_process_info(self) -> list[dict[str, Any]]:
        return self.call("getAllProcessInfo", what="list processes")

    def tail_stdout(self, name: str, length: int = 2000) -> str:
        """The last ``length`` bytes Supervisor captured from the process's stdout (and stderr,
        with ``redirect_stderr``): where a start-up error's one-line reason ends up."""
        text, _offset, _overflow = self.call("tailProcessStdoutLog", name, 0, length, what=f"read the log of {name}")
        return text

    def get_state(self) -> str:
        return self.call("getState", what="get state")["statename"]
