"""``--daemonize``: detach with python-daemon, outside Supervisor only.

The lock is probed before detaching so that a refused start exits 75 in the foreground (after
the detach, the launcher would exit 0 whatever happened). The lock itself is built and taken in
the final daemon process, so the PID file holds the daemon's PID.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable

from mqttd.daemon.lock import ensure_dir, probe
from mqttd.errors import EXIT_FAILURE
from mqttd.identity import Identity


def detach(identity: Identity, body: Callable[[], int]) -> int:
    import daemon

    ensure_dir(identity.run_dir)
    probe(identity.name, identity.lock_path)
    context = daemon.DaemonContext(
        detach_process=True,
        working_directory=os.getcwd(),
        umask=0o027,
        # Our own handlers are installed by the daemon; python-daemon's SIGTERM handler would raise
        # SystemExit in the middle of a transaction.
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    with context:
        try:
            return body()
        except Exception as exc:  # noqa: BLE001 - stderr is /dev/null now; the log has it
            import logging

            logging.getLogger("mqttd").error("daemon failed: %s", exc)
            os._exit(getattr(exc, "exit_code", EXIT_FAILURE))
