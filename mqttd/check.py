"""``mqttd check``: config, handlers, broker and database, without consuming a message."""
from __future__ import annotations

import sys

from .config import Config
from .errors import EXIT_OK, BrokerAuthError, MqttdError
from .identity import Identity
from .lock import is_held


def check(identity: Identity, config: Config, timeout: float = 10.0) -> int:
    from . import tenant
    from .daemon import Canary, build_router
    from .stats import Stats
    from .mqtt.probe import probe_broker

    out = sys.stdout
    problems: list[str] = []
    print(f"project {identity.name}: config {config.path} OK", file=out)
    tenant.setup(config)
    router = build_router(identity, config, Canary(identity, Stats()).route)
    print("routes:", file=out)
    for line in router.describe():
        print(f"  {line}", file=out)
    client_id = (config.broker.client_id or identity.client_id) + "-check"
    b = config.broker
    print(f"broker {b.host}:{b.port} (MQTT {b.protocol}, keepalive {b.keepalive}s, "
          f"session expiry {b.session_expiry}s) as {client_id} with a clean session", file=out)
    res = probe_broker(b, client_id, router.subscriptions(), timeout)
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
              "raise max_queued_messages and enable persistence (see README, Broker settings)", file=out)
    problems += _check_database()
    for path in (identity.run_dir, identity.log_dir):
        from .lock import ensure_dir

        try:
            ensure_dir(path)
            probe = path / f".mqttd-check-{identity.name}"
            probe.write_text("")
            probe.unlink()
        except (MqttdError, OSError) as exc:
            problems.append(f"{path} not writable: {exc}")
    if is_held(identity.lock_path):
        print(f"daemon: running (lock {identity.lock_path} held)", file=out)
    for p in problems:
        print(f"PROBLEM: {p}", file=out)
    if problems:
        raise MqttdError(f"mqttd[{identity.name}]: check failed: {problems[0]}")
    print("check passed", file=out)
    return EXIT_OK


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
