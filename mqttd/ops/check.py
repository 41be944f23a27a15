"""``mqttd check``: config, handlers, broker and database, without consuming a message.

``check`` refuses whatever ``mqttd run`` would refuse at start, with the same message and exit
code, because both go through the same code: ``config.load`` (every key and range),
``tenant.setup`` (the Django settings), ``daemon.build_router`` (routes and handlers) and
``startup_checks`` below (what needs Django and the routes: dedupe keys without the mqttd app,
the metrics listener), which ``Daemon.__init__`` calls too. Only the lock is not a refusal here:
``check`` runs next to a live daemon and says so.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mqttd import config as config_mod
from mqttd.config import Config
from mqttd.daemon.lock import is_held
from mqttd.errors import EXIT_OK, BrokerAuthError, ConfigError, MqttdError
from mqttd.identity import Identity

if TYPE_CHECKING:
    from mqttd.daemon.metrics import MetricsServer
    from mqttd.router import Router

log = logging.getLogger("mqttd.check")


@dataclass
class Startup:
    use_model: bool                        # the mqttd.django app is installed: DeadLetter rows, dedupe keys
    metrics: MetricsServer | None = None   # bound, not yet serving


def startup_checks(config: Config, router: Router, *, warn: Callable[[str], None],
                   metrics_snapshot: Callable[[], dict[str, Any]] | None = None) -> Startup:
    """The start-up refusals that need Django set up and the routes built, shared by ``mqttd run``
    (``Daemon.__init__``) and ``mqttd check``; each raises ConfigError (exit 78). Warnings about
    valid but doubtful settings go to ``warn``.

    ``metrics_snapshot``: bind the metrics listener (when ``status.metrics_port`` is set) and
    return it unstarted; None skips the bind (``check`` while the daemon holds the port)."""
    from mqttd.ingest.deadletters import model_available

    file = str(config.path) if config.path else None
    for text in config_mod.warnings(config):
        warn(text)
    use_model = model_available()
    if not use_model:
        if config.dispatch.dedupe_property:
            raise ConfigError("dedupe keys need the mqttd.django app in INSTALLED_APPS (and migrated)",
                              file=file, key="dispatch.dedupe_property")
        keyed = [r.name for r in router.routes if r.dedupe]
        if keyed:
            raise ConfigError(f"route {keyed[0]} has dedupe=, and dedupe keys need the mqttd.django app in "
                              "INSTALLED_APPS (and migrated)", file=file, key="django.settings")
    metrics = None
    st = config.status
    if st.metrics_port is not None and metrics_snapshot is not None:
        from mqttd.daemon.metrics import MetricsServer

        try:
            metrics = MetricsServer(metrics_snapshot, st.metrics_host, st.metrics_port)
        except (OSError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"cannot listen on {st.metrics_host}:{st.metrics_port}: {reason}",
                              file=file, key="status.metrics_port") from None
    return Startup(use_model, metrics)


def check(identity: Identity, config: Config, timeout: float = 10.0) -> int:
    from mqttd.daemon import tenant
    from mqttd.daemon.run import Canary, build_router
    from mqttd.ingest.stats import Stats
    from mqttd.mqtt.probe import first_reachable, probe_broker

    out = sys.stdout
    problems: list[str] = []
    print(f"project {identity.name}: config {config.path} OK", file=out)
    tenant.setup(config)
    router = build_router(identity, config, Canary(identity, Stats()).route)
    running = is_held(identity.lock_path)
    start = startup_checks(config, router, warn=lambda text: print(f"warning: {text}", file=out),
                           metrics_snapshot=None if running else dict)
    print("routes:", file=out)
    for line in router.describe():
        print(f"  {line}", file=out)
    st = config.status
    if start.metrics is not None:
        print(f"metrics: can listen on {st.metrics_host}:{start.metrics.port}", file=out)
        start.metrics.server.server_close()
    elif st.metrics_port is not None:
        print(f"metrics: {st.metrics_host}:{st.metrics_port} not probed (the running daemon holds it)", file=out)
    client_id = (config.broker.client_id or identity.client_id) + "-check"
    b, dead = first_reachable(config.broker, min(timeout, 5.0))   # broker.hosts: the first node that answers
    for note in dead:
        print(f"warning: {note}", file=out)
    print(f"broker {b.host}:{b.port} (protocol {b.protocol}, keepalive {b.keepalive}s, "
          f"session expiry {b.session_expiry}s) as {client_id} with a clean session", file=out)
    from mqttd.daemon.run import _share_group
    from mqttd.topics import TopicFilter

    share = _share_group(identity, config)
    subs = router.subscriptions()
    # The window and session probes use topics of the check's own, unless a route would see them.
    own = {k: f"mqttd/{identity.name}/check/{k}" for k in ("window", "session")}
    own = {k: t for k, t in own.items() if not any(TopicFilter.parse(s).match(t) is not None for s, _ in subs)}
    res = probe_broker(b, client_id, subs, timeout,
                       share_topic=f"mqttd/{identity.name}/sharecheck" if share else None,
                       share_group=f"{share}-check" if share else None,
                       window_topic=own.get("window"), session_topic=own.get("session"),
                       receive_maximum=b.receive_maximum or min(65535, 2 * config.dispatch.batch_size))
    if res.protocol_refused:
        from mqttd.errors import ConfigError

        raise ConfigError(f'the broker at {b.host}:{b.port} refuses MQTT 5 ({res.protocol_refused}) and protocol = "5" '
                          'asks for it: set protocol = "auto" (5 where the broker has it, else 3.1.1) or "3.1.1"',
                          file=str(config.path), key="broker.protocol")
    _report_broker(res, b, out, problems)
    if res.shared is not None:
        print(f"  shared subscriptions ($share/{share}/...): "
              f"{'delivered' if res.shared else 'NOT delivered: ' + res.shared_reason}", file=out)
    if res.shared is False:
        # What `mqttd run` exits 78 for (mqttd.mqtt.shared): the same refusal here.
        from mqttd.mqtt.shared import not_delivered

        key = "broker.shared_group" if b.shared_group else "numprocs (MQTTD_INSTANCE)"
        raise not_delivered(res.shared_reason, key, str(config.path))
    if not res.connected:
        if res.auth_refused:
            raise BrokerAuthError(f"{res.error} (user {b.username!r})", file=str(config.path), key="broker.username")
        problems.append(f"broker: {res.error}")
    for sub, outcome in res.granted or []:
        print(f"  subscribe {sub}: {outcome}", file=out)
        if outcome.startswith("refused") or outcome.endswith("QoS 0") and not sub.startswith("$"):
            problems.append(f"subscription {sub} {outcome}")
    if res.dropped:
        print(f"  warning: the broker has dropped {res.dropped} messages ($SYS/broker/publish/messages/dropped): "
              "raise max_queued_messages and enable persistence (see docs/brokers.md)", file=out)
    problems += _check_database()
    for path in (identity.run_dir, identity.log_dir):
        from mqttd.daemon.lock import ensure_dir

        try:
            ensure_dir(path)
            probe = path / f".mqttd-check-{identity.name}"
            probe.write_text("")
            probe.unlink()
        except (MqttdError, OSError) as exc:
            problems.append(f"{path} not writable: {exc}")
    if running:
        print(f"daemon: running (lock {identity.lock_path} held)", file=out)
    for p in problems:
        print(f"PROBLEM: {p}", file=out)
    if problems:
        raise MqttdError(f"mqttd[{identity.name}]: check failed: {problems[0]}")
    print("check passed", file=out)
    return EXIT_OK


def _report_broker(res: Any, b: Any, out: Any, problems: list[str]) -> None:
    """The broker as it is (mqttd.mqtt.probe): protocol, grants, window, session, caveats."""
    if not res.connected:
        return
    kind = f" ({res.version})" if res.version else f" ({res.broker_kind})" if res.broker_kind else ""
    note = f": {res.protocol_note}, said once by `run` too" if res.protocol_note else ""
    print(f"  broker{kind} speaks MQTT {res.protocol}{note}", file=out)
    g = res.grants
    if g is not None:
        expiry = "n/a on 3.1.1 (kept until the broker's own limit)" if g.session_expiry is None else f"{g.session_expiry}s"
        print(f"  granted: session expiry {expiry}, keepalive {g.keepalive}s"
              f"{f' (ServerKeepAlive {g.server_keepalive}s)' if g.server_keepalive is not None else ''}, "
              f"maximum QoS {g.maximum_qos}, retained messages and wills "
              f"{'available' if g.retain_available else 'NOT available'}, shared subscriptions "
              f"{'not said' if g.shared_subscriptions is None else 'available' if g.shared_subscriptions else 'NOT available'}"
              f", receive maximum {g.receive_maximum}", file=out)
        from mqttd.mqtt.grants import differences

        for text in differences(g, b.session_expiry, b.keepalive):
            print(f"  warning: {text}", file=out)
        if g.maximum_qos < 1:
            problems.append(f"the broker's maximum QoS is {g.maximum_qos}: at-least-once delivery is impossible")
    if res.window is not None:
        more = "at least " if res.window >= res.window_of else ""
        print(f"  in-flight window: {more}{res.window} QoS 1 messages delivered before the first ack", file=out)
    if res.session_kept is not None or res.session_note:
        print(f"  persistent session across a reconnect: "
              f"{'kept' if res.session_kept else 'NOT kept: ' + res.session_note}", file=out)
        if res.session_kept is False:
            problems.append(f"broker: {res.session_note}: messages sent while mqttd is away are lost")
    for text in res.caveats:
        print(f"  caveat: {text}", file=out)


def _check_database() -> list[str]:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    problems = []
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        executor = MigrationExecutor(connection)
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
        if pending:
            names = ", ".join(f"{m.app_label}.{m.name}" for m, _ in pending[:5])
            problems.append(f"database: {len(pending)} migrations not applied ({names}); run manage.py migrate")
        else:
            print(f"database {connection.vendor} ({connection.settings_dict.get('NAME')}): reachable, migrations applied")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"database: {type(exc).__name__}: {exc}")
    return problems
