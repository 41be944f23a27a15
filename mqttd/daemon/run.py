"""Wires the pieces together and owns the process lifecycle.

Start order (nothing that owns fds or threads exists before a daemonizing fork):
lock -> logging -> django.setup() -> routes -> dispatcher thread -> network thread.

The main loop writes the status (``schema.snapshot``), publishes the canary and runs the
``watchdog`` every 100 ms.

Stop order on SIGTERM/SIGINT (the handler only sets a flag):
stop reading from the socket -> finish and commit the batch in hand -> ack it -> publish the
retained ``offline`` -> disconnect -> close DB connections -> final status -> release the lock.
A second signal exits at once; un-acked messages are delivered again later, never lost.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from typing import Any

from mqttd import __version__
from mqttd.config import Config
from mqttd.daemon import heap, logs, status
from mqttd.daemon.lock import ProjectLock, ensure_dir
from mqttd.daemon.schema import Status, snapshot
from mqttd.daemon.watchdog import Watchdog
from mqttd.errors import EXIT_OK, EXIT_SIGNAL_BASE, ConfigError, MqttdError
from mqttd.identity import Identity
from mqttd.ingest.canary import Canary
from mqttd.ingest.deadletters import DeadLetterSink
from mqttd.ingest.dispatch import Dispatcher
from mqttd.ingest.gapcount import GapCounter, detection_state
from mqttd.ingest.gaps import GapRecorder
from mqttd.ingest.intake import Intake
from mqttd.ingest.poison import PoisonList
from mqttd.ingest.stats import Stats
from mqttd.mqtt.session import Session
from mqttd.mqtt.shared import SharedCheck
from mqttd.ops.check import startup_checks
from mqttd.router import Route, Router, discover, registered_routes, routes_from_config

log = logging.getLogger("mqttd.daemon")

STOP_BUDGET_S = 8.0          # well inside Supervisor's stopwaitsecs (the generated default is 30)


def build_router(identity: Identity, config: Config, canary: Route | None = None) -> Router:
    """Routes from ``mqtt_handlers`` modules and from ``[[subscribe]]``, plus the canary."""
    discover()
    routes = registered_routes() + routes_from_config(config.subscribe, str(config.path) if config.path else None)
    if not routes:
        raise ConfigError("no routes: add @route handlers in an app's mqtt_handlers module or [[subscribe]] "
                          "tables to the config", file=str(config.path) if config.path else None, key="subscribe")
    if canary is not None:
        routes.append(canary)
    return Router(routes, share_group=_share_group(identity, config))


def _share_group(identity: Identity, config: Config) -> str | None:
    """Instances of one project share the load through $share/PROJECT/ unless told otherwise."""
    if config.broker.shared_group:
        return config.broker.shared_group
    return identity.project if identity.instance is not None else None


class Daemon:
    def __init__(self, identity: Identity, config: Config, client_id: str) -> None:
        self.identity, self.config, self.client_id = identity, config, client_id
        self.stats = Stats()
        self.started_at = time.time()
        self.state = "starting"
        self.rate = status.RateMeter()
        self.last_rate = 0.0
        share = _share_group(identity, config)
        self.canary = Canary(identity, self.stats, client_id, share)
        self.router = build_router(identity, config, self.canary.route)
        shared = None
        if share:
            key = "broker.shared_group" if config.broker.shared_group else "numprocs (MQTTD_INSTANCE)"
            shared = SharedCheck(self.canary.topic, self.canary.route.topic.subscription, key,
                                 str(config.path) if config.path else None)
        # Every start-up refusal past the routes, shared with `mqttd check` (also binds the metrics port).
        start = startup_checks(config, self.router, warn=log.warning, metrics_snapshot=lambda: self.snapshot().to_json())
        use_model = start.use_model
        d = config.dispatch
        self.intake = Intake()
        self.sink = DeadLetterSink(identity.deadletter_file, use_model)
        self.poison = PoisonList(identity.run_dir / f"{identity.name}.poison.json")
        receive_max = config.broker.receive_maximum or min(65535, 2 * d.batch_size)
        self.session = Session(config.broker, client_id, self.router.subscriptions(), self.intake,
                               d.max_backlog, identity.status_topic,
                               identity.subscriptions_path, receive_maximum=receive_max, takeover_rounds=3,
                               owner_topic=identity.owner_topic(client_id), shared=shared)
        self.dispatcher = Dispatcher(self.router, self.intake, self.session, self.sink, self.stats,
                                     batch_size=d.batch_size, linger=d.batch_linger_ms / 1000,
                                     max_payload=d.max_payload, dedupe_property=d.dedupe_property,
                                     use_dedupe_model=use_model, poison=self.poison)
        self.dispatcher.committed_hooks.append(self.canary.committed)
        # Gap detection (docs/operations.md, mqttd.ingest.gaps): recorded in each batch's transaction, counted
        # from the table in a thread of its own after commits and settle deadlines; off without the mqttd app.
        off = detection_state(use_model)
        self.gap_detection = off or "on"
        self.gaps = GapCounter(identity.project, config.status.gap_settle_s) if off is None else None
        if self.gaps is not None:
            self.dispatcher.runner.gaps = GapRecorder(identity.project, on_commit=self.gaps.nudge)
        self.watchdog = Watchdog(config, self.session, self.dispatcher, self.poison)
        self.metrics = start.metrics
        self._signals = 0
        self._reopen = False
        self._stop_requested = False

    # ---- signals: only set flags --------------------------------------------------------------------
    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals > 1:
            # Second signal: now. Un-acked messages come back from the broker as duplicates.
            os._exit(EXIT_SIGNAL_BASE + signum)
        # A plain flag, not threading.Event.set(): the handler runs in the main thread, which may
        # be inside Event.wait() holding the event's (non-reentrant) lock: set() would deadlock
        # there and the daemon would never stop (seen in the test suite, reproduced in isolation).
        self._stop_requested = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._reopen = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        # The main loop sleeps a second at a time (an idle daemon costs next to nothing); a signal
        # wakes it at once through this fd, which Python writes to when one arrives.
        self._wake_r, wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w
        signal.set_wakeup_fd(wake_w.fileno())

    def _nap(self, seconds: float) -> None:
        """Sleep up to ``seconds``, less if a signal arrives."""
        if select.select([self._wake_r], [], [], seconds)[0]:
            try:
                self._wake_r.recv(4096)
            except OSError:
                pass

    # ---- main loop ------------------------------------------------------------------------------------
    def serve(self) -> int:
        self.install_signals()
        log.info("mqttd %s starting: project %s, client id %s, routes: %s", __version__, self.identity.name,
                 self.client_id, "; ".join(self.router.describe()))
        heap.settle()                          # start-up is done: see mqttd.daemon.heap
        self.dispatcher.start()
        if self.gaps is not None:
            self.gaps.start(max(self.config.status.interval, 2.0))
        self.session.start()
        self.state = "running"
        if self.metrics is not None:
            self.metrics.start()
        interval = self.config.status.interval
        next_status = time.monotonic() + 0.1   # the first status once the threads are up
        next_canary = time.monotonic() + 1.0
        try:
            while not self._stop_requested:
                # Asleep until the next status or canary is due (at most 1 s, for the watchdog) or a signal.
                self._nap(max(0.0, min(1.0, next_status - time.monotonic(), next_canary - time.monotonic())))
                now = time.monotonic()
                self.watchdog.check()
                if self._reopen:
                    self._reopen = False
                    logs.reopen()
                    log.info("log file reopened (SIGHUP)")
                if now >= next_canary:
                    next_canary = now + self.config.status.canary_interval
                    if self.session.state.connected:
                        self.session.publish(self.canary.topic, self.canary.payload(), qos=1)
                if now >= next_status:
                    next_status = now + interval
                    self.write_status()
        except MqttdError as exc:
            self.state = "failed"
            self.write_status(error=str(exc))
            raise
        self.shutdown()
        return EXIT_OK

    def shutdown(self) -> None:
        """The ordered stop: see the module docstring."""
        self.state = "stopping"
        self.write_status()
        t0 = time.monotonic()
        log.info("stopping: finishing the batch in hand")
        self.session.stop_reading()
        if self.gaps is not None:
            self.gaps.stop()
        self.dispatcher.stop(timeout=STOP_BUDGET_S - 3)
        stuck = self.dispatcher.thread.is_alive()
        current = self.dispatcher.current
        if stuck and current is not None:
            msgs, route, since = current
            # Not recorded as a hang: it has not reached handler_timeout (the watchdog would
            # have), so it may just be slow; the next process runs it again.
            log.warning("the batch in hand did not finish within %.0fs (handler %s running for %.1fs on %s): "
                        "leaving it un-acked", STOP_BUDGET_S - 3, route.name, time.monotonic() - since,
                        msgs[0].topic if msgs else "?")
        left = len(self.intake) + (self.dispatcher.in_hand if stuck else 0)
        if left:
            log.info("%d received messages left un-acked; the broker delivers them again", left)
        self.session.stop(timeout=max(1.0, STOP_BUDGET_S - (time.monotonic() - t0)))
        from django.db import connections

        connections.close_all()
        if self.metrics is not None:
            self.metrics.stop()
        self.state = "stopped"
        self.write_status()
        if stuck:
            log.warning("stopped in %.2fs, without finishing the batch in hand", time.monotonic() - t0)
        else:
            log.info("stopped cleanly in %.2fs", time.monotonic() - t0)

    def snapshot(self) -> Status:
        return snapshot(self)

    def write_status(self, error: str | None = None) -> None:
        self.last_rate = round(self.rate.sample(time.monotonic(), self.stats.tenant_settled), 2)
        data = self.snapshot()
        data.error = error
        try:
            status.write_atomic(self.identity.status_path, data)
        except OSError as exc:
            log.warning("cannot write status file %s: %s", self.identity.status_path, exc)


def run(identity: Identity, config: Config, *, setup_django: bool = True, log_level: str = "INFO") -> int:
    """Run the daemon in this process until stopped. Returns the exit code (0 on a clean stop)."""
    os.umask(0o027)
    ensure_dir(identity.run_dir)
    project_lock = ProjectLock(identity.name, identity.lock_path)
    project_lock.acquire()
    try:
        client_id = config.broker.client_id or identity.client_id
        logs.setup(identity, client_id, log_level)
        if os.geteuid() == 0 and not os.environ.get("MQTTD_ALLOW_ROOT"):
            log.warning("running as root: run each tenant as its own user (inventory `user`, or "
                        "User= in systemd); set MQTTD_ALLOW_ROOT=1 to silence this")
        if setup_django:
            from mqttd.daemon import tenant

            tenant.setup(config)
        daemon = Daemon(identity, config, client_id)
        try:
            return daemon.serve()
        except MqttdError as exc:
            log.error("%s", exc)
            raise
    finally:
        project_lock.release()
