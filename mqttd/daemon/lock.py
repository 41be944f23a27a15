"""The per-project lock: a kernel flock on RUN_DIR/NAME.pid, held for the life of the process.

The PID text in the file is for humans; liveness is always judged by the flock itself (a holder
killed with SIGKILL releases it with its last descriptor, so there is never a stale lock). The
lock is built and acquired in the final process, after any daemonizing fork (filelock refuses an
object inherited across a fork), and a losing contender never truncates or rewrites the file.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import filelock

from mqttd.errors import LockHeld, MqttdError

# preserve_lock_file= and on_acquired= (and opening without O_TRUNC, so that a losing contender
# never truncates the holder's PID) exist from filelock 3.30; pyproject.toml requires it.
FILELOCK_FLOOR = (3, 30)

# A contender retries for a short while so that a health probe, which holds the lock for a few
# microseconds, never makes a legitimate start fail.
ACQUIRE_TIMEOUT_S = 0.5


def ensure_dir(path: Path, mode: int = 0o750) -> None:
    """Create ``path`` (and parents) with ``mode`` if missing; never loosen an existing one."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise MqttdError(f"cannot create {path}: {exc.strerror}") from None


def read_pid(path: Path) -> int | None:
    """The PID written by the last holder, or None. Never trust it for liveness."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# A new holder takes the flock an instant before it writes its PID (filelock's on_acquired), so a
# contender that loses in that instant finds the file empty. It waits this long for the PID, so
# that a refusal names the process that holds the lock rather than "an unknown pid".
HOLDER_PID_WAIT_S = 1.0


def holder_pid(path: Path) -> int | None:
    """The PID of the process holding ``path``, waiting briefly for a new holder to write it."""
    deadline = time.monotonic() + HOLDER_PID_WAIT_S
    while True:
        pid = read_pid(path)
        if pid is not None or time.monotonic() >= deadline or not is_held(path):
            return pid
        time.sleep(0.01)


def is_held(path: Path) -> bool:
    """True if some process holds the flock on ``path`` (probed without blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def filelock_too_old() -> str | None:
    """The installed filelock's version if it is older than FILELOCK_FLOOR, else None."""
    try:
        have = tuple(int(part) for part in filelock.__version__.split(".")[:2])
    except ValueError:          # an unusual version string: let filelock itself decide
        return None
    return filelock.__version__ if have < FILELOCK_FLOOR else None


def _write_pid(fd: int) -> None:
    data = f"{os.getpid()}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


class ProjectLock:
    """Hold RUN_DIR/NAME.pid for this process's life."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        self._lock: filelock.BaseFileLock | None = None

    def acquire(self) -> None:
        ensure_dir(self.path.parent)
        old = filelock_too_old()
        if old is not None:
            need = ".".join(map(str, FILELOCK_FLOOR))
            raise MqttdError(f"mqttd[{self.name}]: filelock {old} is too old; mqttd needs filelock>={need} "
                             f'(pip install "filelock>={need}")')
        lock = filelock.FileLock(
            str(self.path), timeout=ACQUIRE_TIMEOUT_S, mode=0o640, thread_local=False,
            preserve_lock_file=True, on_acquired=_write_pid,
        )
        try:
            lock.acquire()
        except filelock.Timeout:
            raise LockHeld(self.name, str(self.path), holder_pid(self.path)) from None
        except OSError as exc:
            raise MqttdError(f"mqttd[{self.name}]: cannot open lock {self.path}: {exc.strerror}") from None
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None

    def __enter__(self) -> ProjectLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def probe(name: str, path: Path) -> None:
    """Raise LockHeld if another process holds the lock (used before daemonizing)."""
    if is_held(path):
        raise LockHeld(name, str(path), holder_pid(path))
