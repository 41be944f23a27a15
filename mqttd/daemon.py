"""Wires the pieces together and owns the process lifecycle.

Start order (nothing that owns fds or threads exists before a daemonizing fork):
lock -> logging -> django.setup() -> routes -> dispatcher thread -> network thread.

Stop order on SIGTERM/SIGINT (the handler only sets a flag):
stop reading from the socket -> finish and commit the batch in hand -> ack it -> publish the
retained ``offline`` -> disconnect -> close DB connections -> final status -> release the lock.
A second signal exits at once; un-acked messages are delivered again later, never lost.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from . import __version__, logs, status
from .config import Config
from .deadletters import DeadLetterSink, model_available
from .dispatch import Dispatcher
from .intake import Intake
from .errors import ConfigError, MqttdError, WatchdogTripped
from .identity import Identity
from .lock import ProjectLock, ensure_dir
from .canary import Canary
from .message import Message
from .poison import PoisonList
from .router import Route, Router, discover, registered_routes, routes_from_config
from .stats import Stats
from .mqtt.session import Session

log = logging.getLogger("mqttd.daemon")

STOP_BUDGET_S = 8.0          # well inside Supervisor's stopwaitsecs (the generated default is 30)
LOOP_STALL_S = 30.0          # the network loop iterates every 10 ms; 30 s without a beat is a hang


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
        self._last_rate = 0.0
        self.canary = Canary(identity, self.stats)
        self.router = build_router(identity, config, self.canary.route)
        use_model = model_available()
        if not use_model and (config.dispatch.dedupe_property or any(r.dedupe for r in self.router.routes)):
            raise ConfigError("dedupe keys need the mqttd.django app in INSTALLED_APPS (and migrated)",
                              file=str(config.path) if config.path else None, key="dispatch.dedupe_property")
        d = config.dispatch
        self.intake = Intake()
        self.sink = DeadLetterSink(identity.deadletter_file, use_model)
        self.poison = PoisonList(identity.run_dir / f"{identity.name}.poison.json")
        self.dispatcher = Dispatcher(self.router, self.intake, self._ack, self.sink, self.stats,
                                     batch_size=d.batch_size, linger=d.batch_linger_ms / 1000,
                                     max_payload=d.max_payload, dedupe_property=d.dedupe_property,
                                     use_dedupe_model=use_model, poison=self.poison)
        self.dispatcher.committed_hooks.append(self.canary.committed)
        receive_max = config.broker.receive_maximum or min(65535, 2 * d.batch_size)
        self.session = Session(config.broker, client_id, self.router.subscriptions(), self._deliver,
                               self._backlog, d.max_backlog, identity.status_topic,
                               identity.subscriptions_path, receive_maximum=receive_max, takeover_rounds=3,
                               owner_topic=identity.owner_topic(client_id))
        self.metrics = None
        if config.status.metrics_port is not None:
            from .metrics import MetricsServer

            try:
                self.metrics = MetricsServer(self._metrics_snapshot, config.status.metrics_host,
                                             config.status.metrics_port)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {config.status.metrics_host}:{config.status.metrics_port}: "
                                  f"{exc.strerror}", file=str(config.path) if config.path else None,
                                  key="status.metrics_port") from None
        self._signals = 0
        self._reopen = False
        self._stop_requested = False

    # ---- glue between threads ---------------------------------------------------------------------
    def _deliver(self, msg: Message) -> None:
        self.stats.received += 1
        self.intake.put(msg)

    def _ack(self, items: list[tuple[int, int]], oldest_received_at: float) -> None:
        if items:
            self.session.ack(items, oldest_received_at)

    def _backlog(self) -> int:
        return len(self.intake)

    # ---- signals: only set flags --------------------------------------------------------------------
    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals > 1:
            # Second signal: now. Un-acked messages come back from the broker as duplicates.
            os._exit(128 + signum)
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

    # ---- main loop ------------------------------------------------------------------------------------
    def serve(self) -> int:
        self.install_signals()
        log.info("mqttd %s starting: project %s, client id %s, routes: %s", __version__, self.identity.name,
                 self.client_id, "; ".join(self.router.describe()))
        self.dispatcher.start()
        self.session.start()
        self.state = "running"
        if self.metrics is not None:
            self.metrics.start()
        interval = self.config.status.interval
        next_status = 0.0
        next_canary = time.monotonic() + 1.0
        try:
            while not self._stop_requested:
                time.sleep(0.1)
                now = time.monotonic()
                if self.session.fatal is not None:
                    self._raise_fatal(self.session.fatal)
                self._watchdog()
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
        return 0

    def _raise_fatal(self, exc: BaseException) -> None:
        if isinstance(exc, MqttdError):
            raise exc
        raise WatchdogTripped(f"network thread died: {exc!r}")

    def _watchdog(self) -> None:
        s = self.session
        if not s.thread.is_alive():
            raise WatchdogTripped(f"network thread died: {s.fatal!r}" if s.fatal else "network thread ended")
        if not self.dispatcher.thread.is_alive():
            raise WatchdogTripped(f"dispatcher thread died: {self.dispatcher.fatal!r}")
        now = time.monotonic()
        current, limit_s = self.dispatcher.current, self.config.dispatch.handler_timeout
        if current is not None and now - current[2] > limit_s:
            msgs, route, _ = current
            self.poison.record_hang(msgs, route.name, limit_s)
            what = msgs[0].topic if len(msgs) == 1 else f"a batch of {len(msgs)} messages"
            raise WatchdogTripped(f"handler {route.name} hung on {what} for more than {limit_s:g}s "
                                  "(dispatch.handler_timeout): exiting so that the process is restarted; "
                                  "the message is set aside as a dead letter instead of running again")
        if now - s.state.loop_beat > LOOP_STALL_S:
            raise WatchdogTripped(f"network loop stalled for {now - s.state.loop_beat:.0f}s")
        last_in = s.last_bytes_received()
        limit = 2 * self.config.broker.keepalive + 10
        if s.state.connected and last_in is not None and now - last_in > limit:
            raise WatchdogTripped(f"connection moved no packets for {now - last_in:.0f}s (not even PINGRESP)")

    def shutdown(self) -> None:
        """The ordered stop: see the module docstring."""
        self.state = "stopping"
        self.write_status()
        t0 = time.monotonic()
        log.info("stopping: finishing the batch in hand")
        self.session.stop_reading()
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

    def snapshot(self) -> dict[str, Any]:
        st, ss = self.stats, self.session.state
        now = time.time()
        return {
            "project": self.identity.project, "instance": self.identity.instance, "name": self.identity.name,
            "pid": os.getpid(), "version": __version__, "client_id": self.client_id, "state": self.state,
            "started_at": self.started_at, "updated_at": now,
            "connected": ss.connected, "last_connected_at": ss.last_connected_at,
            "last_disconnected_at": ss.last_disconnected_at, "last_error": ss.last_error,
            "reconnects": ss.reconnects, "session_gaps": ss.session_gaps, "generation": ss.generation,
            "subscribe_failures": list(ss.subscribe_failures), "paused_reading": ss.paused_reading,
            "subscriptions": [s for s, _ in self.session.subscriptions],
            "metrics_port": self.metrics.port if self.metrics is not None else None,
            "backlog": len(self.intake) + self.dispatcher.in_hand,
            "rate_1m": self._last_rate,
            **_percentiles("ack_latency_ms", self.session.ack_latencies),
            **st.as_dict(),
        }

    def _metrics_snapshot(self) -> dict[str, Any]:
        data = self.snapshot()
        data["rate_1m"] = self._last_rate
        return data

    def write_status(self, error: str | None = None) -> None:
        self._last_rate = round(self.rate.sample(time.monotonic(), self.stats.handled), 2)
        data = self.snapshot()
        if error:
            data["error"] = error
        try:
            status.write_atomic(self.identity.status_path, data)
        except OSError as exc:
            log.warning("cannot write status file %s: %s", self.identity.status_path, exc)


def _percentiles(name: str, seconds: Any) -> dict[str, float | None]:
    values = sorted(seconds)
    if not values:
        return {f"{name}_p50": None, f"{name}_p99": None}
    pick = lambda q: round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)  # noqa: E731
    return {f"{name}_p50": pick(0.5), f"{name}_p99": pick(0.99)}


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
            from . import tenant

            tenant.setup(config)
        daemon = Daemon(identity, config, client_id)
        try:
            return daemon.serve()
        except MqttdError as exc:
            log.error("%s", exc)
            raise
    finally:
        project_lock.release()
