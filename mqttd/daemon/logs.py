"""Per-instance file logging: LOG_ROOT/NAME/mqttd.log, reopened when moved or on SIGHUP.

Every line carries the project name, the pid and the client id, so lines from several tenants
can be grepped apart after they are merged. The handlers hang off the ``mqttd`` logger only, so
a tenant's Django ``LOGGING`` keeps working for its own loggers (``reattach`` re-enables ours if
``django.setup()`` disabled existing loggers).
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from mqttd.daemon.lock import ensure_dir
from mqttd.identity import Identity

LOGGER_NAME = "mqttd"
_FORMAT = "%(asctime)s %(levelname)s mqttd[{name}] pid={pid} client={client}: %(message)s"


def _formatter(identity: Identity, client_id: str) -> logging.Formatter:
    fmt = _FORMAT.format(name=identity.name, pid=os.getpid(), client=client_id)
    return logging.Formatter(fmt)


def setup(identity: Identity, client_id: str, level: str = "INFO", to_stderr: bool | None = None) -> logging.Logger:
    """Attach the file handler (and, on a terminal, a WARNING-and-up stderr handler).

    Under Supervisor stderr is not a terminal: it then carries only the one-line reason the CLI
    prints when the process exits on an error, and the whole story is in the log file.

    A log directory that cannot be created or written is reported once on stderr and the daemon
    carries on logging to stderr: messages must not be lost because the log disk is full.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if to_stderr is None:
        to_stderr = sys.stderr.isatty()
    logger.setLevel(level)
    logger.propagate = False
    formatter = _formatter(identity, client_id)
    try:
        ensure_dir(identity.log_dir)
        handler = logging.handlers.WatchedFileHandler(identity.log_file, encoding="utf-8")
    except Exception as exc:  # noqa: BLE001 - any failure here means "no file log", never "no daemon"
        print(f"mqttd[{identity.name}]: warning: cannot log to {identity.log_file}: {exc}; logging to stderr",
              file=sys.stderr)
        handler = logging.StreamHandler(sys.stderr)
        to_stderr = False
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    if to_stderr:
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        err.setFormatter(formatter)
        logger.addHandler(err)
    # A full disk must not print a traceback per log line; the status file shows the state.
    logging.raiseExceptions = False
    return logger


def reopen() -> None:
    """Reopen the log file (SIGHUP from logrotate). Called from the main loop, not the handler."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if isinstance(handler, logging.handlers.WatchedFileHandler):
            handler.acquire()
            try:
                if handler.stream:
                    handler.stream.close()
                handler.stream = handler._open()
                handler._statstream()
            finally:
                handler.release()


def reattach() -> None:
    """After ``django.setup()``: undo ``disable_existing_loggers`` for our own loggers."""
    manager = logging.getLogger(LOGGER_NAME).manager
    for name, logger in list(manager.loggerDict.items()):
        if (name == LOGGER_NAME or name.startswith(LOGGER_NAME + ".")) and isinstance(logger, logging.Logger):
            logger.disabled = False


def get(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
