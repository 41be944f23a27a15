"""`mqttd recover`: restart, through Supervisor's XML-RPC, the instances that are down or unhealthy.

One line per instance of every inventory project: what Supervisor and the health verdict
(``status.verdict``; docs/operations.md, 'Health') say, and what was done about it.

- STOPPED is an operator's decision: reported, never touched. STARTING / STOPPING: left to Supervisor.
- A lock held by a process Supervisor did not start (a run by hand, a ``--daemonize`` copy) is
  named (pid, command line) and left alone, as broken: killing it is the operator's call.
- EXITED with 73 (it gave up a client-id fight with another process): named, left alone.
- FATAL or EXITED: startProcess. BACKOFF: stopProcess, then startProcess. RUNNING but unhealthy
  (stale status file, stale canary, disconnected too long, database down ...): stopProcess, then
  startProcess. Then wait up to SETTLE_S for the new process to be healthy *and* to have made a
  canary round trip of its own, which is what proves a zombie is gone.
- Crash-loop brake: at most MAX_RESTARTS restarts of one instance within WINDOW_S, counted in
  RUN_DIR/NAME.recover.json (flock-held while an instance is judged and restarted, so the cron job
  and the event listener never act on one instance at once); past that, "giving up until HH:MM".

Exit 0 when every instance is healthy, stopped on purpose, or restarted and healthy; 1 otherwise
(with ``--dry-run`` too, when something would have to be done).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqttd.daemon import lock, status
from mqttd.deploy.inventory import Project, load_inventory
from mqttd.deploy.rpc import Supervisor
from mqttd.errors import EXIT_OK, EXIT_TAKEOVER, EXIT_UNHEALTHY, SupervisorError
from mqttd.identity import Identity

MAX_RESTARTS = 3             # restarts of one instance ...
WINDOW_S = 3600.0            # ... within this window, then recover gives up until one ages out
SETTLE_S = 30.0              # how long a restarted instance has to prove itself healthy
RESTARTABLE = ("FATAL", "EXITED", "BACKOFF")
# Supervisor faults as an operator should read them ({name} is the group:process name).
_FAULTS = {
    "ABNORMAL_TERMINATION": "it failed to start (exited during startsecs)",
    "SPAWN_ERROR": "it failed to start",
    "BAD_NAME": "Supervisor has no process {name} (run mqttd deploy --apply)",
    "NO_FILE": "its command does not exist",
    "NOT_EXECUTABLE": "its command is not executable",
}


@dataclass(frozen=True)
class Outcome:
    line: str
    broken: bool


def recover(args: argparse.Namespace) -> int:
    """The `mqttd recover` command (args: inventory, supervisor_url, dry_run)."""
    inventory = load_inventory(args.inventory)
    sv = Supervisor.from_args(args.supervisor_url, os.environ)
    ok = recover_projects(inventory.projects, sv, dry_run=args.dry_run, out=lambda line: print(line, flush=True))
    return EXIT_OK if ok else EXIT_UNHEALTHY


def recover_projects(projects: Iterable[Project], sv: Supervisor, *, dry_run: bool = False,
                     out: Callable[[str], None] = print) -> bool:
    """Judge (and unless ``dry_run`` recover) every instance of ``projects``, one line each through
    ``out``. True if nothing stays broken."""
    sv.get_state()      # supervisord unreachable: one error for the run, not one per instance
    ok = True
    for project in projects:
        for ident in project.identities(os.environ):
            outcome = recover_instance(project, ident, sv, dry_run)
            out(outcome.line)
            ok = ok and not outcome.broken
    return ok


def process_name(project: Project, ident: Identity) -> str:
    """Supervisor's ``group:process`` for one instance (``bnp-mqtt:bnp-mqtt-1`` with numprocs)."""
    name = project.program if ident.instance is None else f"{project.program}-{ident.instance}"
    return f"{project.program}:{name}"


def recover_instance(project: Project, ident: Identity, sv: Supervisor, dry_run: bool = False) -> Outcome:
    name = process_name(project, ident)
    history = History(ident.run_dir / f"{ident.name}.recover.json").open(write=not dry_run)
    try:
        return _recover(project, ident, name, sv, history, dry_run)
    except SupervisorError as exc:
        return Outcome(f"{ident.name}: {_fault_text(exc, name)}", True)
    finally:
        history.close()


def _recover(project: Project, ident: Identity, name: str, sv: Supervisor, history: History,
             dry_run: bool) -> Outcome:
    label = ident.name
    info = sv.get_process_info(name)
    state, pid = info["statename"], info["pid"]
    held = lock.is_held(ident.lock_path)
    if held:
        known = {i["pid"] for i in sv.get_all_process_info() if i["group"] == project.program and i["pid"]}
        holder = lock.holder_pid(ident.lock_path)
        if holder not in known:
            return Outcome(f"{label}: {state}; its lock {ident.lock_path} is held by {describe_pid(holder)}, "
                           f"which Supervisor did not start: left alone (stop it, then `supervisorctl start "
                           f"{name}`)", True)
    if state == "STOPPED":
        return Outcome(f"{label}: STOPPED (by an operator): left alone", False)
    if state in ("STARTING", "STOPPING"):
        return Outcome(f"{label}: {state}: left to Supervisor", False)
    if state == "RUNNING":
        v = status.verdict(status.read(ident.status_path), held)
        if v.healthy:
            return Outcome(f"{label}: RUNNING, healthy (pid {pid})", False)
        found = f"RUNNING (pid {pid}) but UNHEALTHY: {v.reason}"
        steps: tuple[str, ...] = ("stop", "start")
    elif state == "EXITED" and info.get("exitstatus") == EXIT_TAKEOVER:
        return Outcome(f"{label}: EXITED 73: it stopped because another process uses its client id "
                       f"(see {ident.log_file}): left alone; give each copy its own client id, then "
                       f"`supervisorctl start {name}`", True)
    elif state in RESTARTABLE:
        found = state + (f" ({info['description']})" if info.get("description") else "")
        steps = ("stop", "start") if state == "BACKOFF" else ("start",)
    else:
        return Outcome(f"{label}: {state}: not a state recover knows how to fix", True)

    now = time.time()
    recent = history.recent(now)
    if len(recent) >= MAX_RESTARTS:
        until = time.strftime("%H:%M", time.localtime(recent[-MAX_RESTARTS] + WINDOW_S))
        return Outcome(f"{label}: {found}: giving up until {until} ({len(recent)} restarts in the last "
                       f"{WINDOW_S / 60:.0f} min; see {ident.log_file} and `supervisorctl tail {name}`)", True)
    if dry_run:
        return Outcome(f"{label}: {found}: would {' and '.join(steps)} {name}", True)
    if history.error:
        return Outcome(f"{label}: {found}: not restarting: cannot record it in {history.path} ({history.error})", True)
    history.record(now)
    try:
        if "stop" in steps:
            _call(sv.stop_process, name, tolerate="NOT_RUNNING")
        _call(sv.start_process, name, tolerate="ALREADY_STARTED")
    except SupervisorError as exc:
        return Outcome(f"{label}: {found}: restart failed: {_fault_text(exc, name)}{_last_words(sv, name)}", True)
    healthy, result = settle(sv, name, ident, since=now)
    return Outcome(f"{label}: {found}: restarted, {result}", not healthy)


def _call(method: Callable[[str], None], name: str, tolerate: str) -> None:
    """A stop or start that does not mind having been overtaken by Supervisor itself."""
    try:
        method(name)
    except SupervisorError as exc:
        if exc.fault != tolerate:
            raise


def settle(sv: Supervisor, name: str, ident: Identity, since: float, timeout: float = SETTLE_S) -> tuple[bool, str]:
    """Wait for the restarted process to be healthy with a canary round trip after ``since``."""
    deadline = time.monotonic() + timeout
    while True:
        info = sv.get_process_info(name)
        st = status.read(ident.status_path)
        pid = info["pid"]
        if info["statename"] in (*RESTARTABLE, "STOPPED"):
            return False, f"but it is {info['statename']} again{_last_words(sv, name)}"
        if info["statename"] != "RUNNING" or st is None or st.pid != pid:
            why = f"but pid {pid or '-'} is {info['statename']} and has written no status yet"
        else:
            v = status.verdict(st, lock.is_held(ident.lock_path))
            if v.healthy and float(st.canary_at or 0) >= since:
                return True, f"pid {pid}, healthy"
            why = f"pid {pid}, but " + (f"still unhealthy: {v.reason}" if not v.healthy
                                        else "no canary round trip since the restart")
        if time.monotonic() >= deadline:
            return False, f"{why} after {timeout:.0f}s"
        time.sleep(0.25)


def describe_pid(pid: int | None) -> str:
    """``pid 123 (/venv/bin/python -m mqttd run --project bnp)``, as far as /proc tells."""
    if pid is None:
        return "a process that wrote no pid in it"
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid} (command line not readable)"
    cmd = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    return f"pid {pid} ({cmd[:200]})" if cmd else f"pid {pid}"


def _fault_text(exc: SupervisorError, name: str) -> str:
    return _FAULTS[exc.fault].format(name=name) if exc.fault in _FAULTS else str(exc)


def _last_words(sv: Supervisor, name: str) -> str:
    """The last line the process wrote (a start-up error's one-line reason), if any."""
    try:
        lines = [ln.strip() for ln in sv.tail_stdout(name, 2000).splitlines() if ln.strip()]
    except SupervisorError:
        return ""
    return f"; its last words: {lines[-1][:300]}" if lines else ""


class History:
    """Recent restart times of one instance (RUN_DIR/NAME.recover.json), flock-held from ``open`` to
    ``close``. O_NOFOLLOW: recover may run as root in a run dir the tenant's user can write. A file
    that cannot be written is still read, so looking needs no rights; only a restart is refused."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: list[float] = []
        self.error: str | None = None
        self._fd: int | None = None

    def open(self, write: bool = True) -> History:
        if write:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                self.times = self._parse(os.pread(self._fd, 1 << 16, 0))
                return self
            except OSError as exc:
                self.close()
                self.error = exc.strerror or str(exc)
        try:
            self.times = self._parse(self.path.read_bytes())
        except OSError:
            pass
        return self

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # releases the flock
            self._fd = None

    @staticmethod
    def _parse(raw: bytes) -> list[float]:
        try:
            data: Any = json.loads(raw or b"{}")
            return [float(t) for t in data.get("restarts", [])]
        except (ValueError, TypeError, AttributeError):
            return []             # an unreadable history starts counting again

    def recent(self, now: float) -> list[float]:
        return sorted(t for t in self.times if now - WINDOW_S < t <= now)

    def record(self, now: float) -> None:
        """Count a restart before it is attempted: a failed start counts towards the brake too."""
        assert self._fd is not None, "history not open for writing"
        self.times = [*self.recent(now), now]
        data = json.dumps({"restarts": self.times}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)
