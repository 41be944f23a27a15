"""Command line: argv -> Config -> action. The only place an MqttdError becomes an exit code."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .errors import EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE, MqttdError, UsageError

COMMANDS = ("run", "check", "status", "health", "replay", "deploy", "recover")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(f"mqttd: {message} (see mqttd --help)")


def _identity_args(p: argparse.ArgumentParser, required_project: bool = False) -> None:
    p.add_argument("--project", help="project name (else $MQTTD_PROJECT, else $PROJECT_NAME)")
    p.add_argument("--instance", help="instance number for numprocs scale-out (else $MQTTD_INSTANCE)")
    p.add_argument("--config", help="TOML config (else $MQTTD_CONFIG, else /etc/mqttd/PROJECT.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqttd", description="One supervised MQTT -> Django ORM ingestion daemon per project.")
    parser.add_argument("--version", action="version", version=f"mqttd {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("run", help="run the daemon in the foreground (what Supervisor starts)")
    _identity_args(p)
    p.add_argument("--daemonize", action="store_true", help="detach (never under Supervisor)")
    p.add_argument("--metrics-port", type=int, help="serve /metrics and /healthz on this port (0: any free port)")
    p.add_argument("--metrics-host", help="address for the metrics endpoint (default 127.0.0.1)")
    p.add_argument("--log-level", default=os.environ.get("MQTTD_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    p = sub.add_parser("check", help="validate config, handlers, broker and database; consume nothing")
    _identity_args(p)
    p.add_argument("--timeout", type=float, default=10.0)

    p = sub.add_parser("status", help="one row per instance")
    p.add_argument("--project")
    p.add_argument("--instance")
    p.add_argument("--all", action="store_true", help="every instance in the run dir")
    p.add_argument("--inventory", help="also list the inventory's projects that are not running")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("health", help="exit 0 healthy, 1 unhealthy (reason on stdout)")
    p.add_argument("--project")
    p.add_argument("--instance")

    p = sub.add_parser("replay", help="run dead letters again through their routes")
    _identity_args(p)
    p.add_argument("--id", type=int, action="append", dest="ids")
    p.add_argument("--topic", help="only letters whose topic matches this filter")
    p.add_argument("--since", help="only letters created at or after this ISO time")
    p.add_argument("--dry-run", action="store_true")

    p = sub.add_parser("deploy", help="write Supervisor conf.d entries from an inventory")
    p.add_argument("--inventory", required=True)
    p.add_argument("--conf-dir", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--apply", action="store_true", help="make supervisord reread and update")
    p.add_argument("--supervisor-url")

    p = sub.add_parser("recover", help="restart instances that are down or unhealthy, through Supervisor")
    p.add_argument("--inventory", required=True)
    p.add_argument("--supervisor-url")
    p.add_argument("--dry-run", action="store_true")
    return parser


def _normalise(argv: list[str]) -> list[str]:
    """`mqttd --project X` means `mqttd run --project X`."""
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    return ["run", *argv]


def _identity(args: argparse.Namespace):
    from .identity import from_args

    return from_args(args.project, args.instance, os.environ)


def _config(args: argparse.Namespace, identity):
    from .config import config_path, load

    return load(config_path(args.config, identity, os.environ), os.environ)


def cmd_run(args: argparse.Namespace) -> int:
    from . import daemon

    identity = _identity(args)
    config = _config(args, identity)
    if args.metrics_port is not None or args.metrics_host:
        import dataclasses

        st = dataclasses.replace(config.status,
                                 metrics_port=args.metrics_port if args.metrics_port is not None else config.status.metrics_port,
                                 metrics_host=args.metrics_host or config.status.metrics_host)
        config = dataclasses.replace(config, status=st)
    if args.daemonize:
        if os.environ.get("SUPERVISOR_ENABLED"):
            print(f"mqttd[{identity.name}]: warning: --daemonize ignored under Supervisor "
                  "(it watches the pid it started)", file=sys.stderr)
        else:
            from .daemonize import detach

            return detach(identity, lambda: daemon.run(identity, config, log_level=args.log_level))
    return daemon.run(identity, config, log_level=args.log_level)


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check

    identity = _identity(args)
    return check(identity, _config(args, identity), timeout=args.timeout)


def _selected(args: argparse.Namespace):
    from .identity import derive, from_args
    from .status import instances_in

    if args.project or os.environ.get("MQTTD_PROJECT") or os.environ.get("PROJECT_NAME"):
        if getattr(args, "all", False):
            raise UsageError("mqttd status: give --project or --all, not both")
        return [from_args(args.project, args.instance, os.environ)]
    if getattr(args, "all", False):
        base = derive("x", None, os.environ)
        return [derive(p, i, os.environ) for p, i in instances_in(base.run_dir)]
    if getattr(args, "inventory", None):
        return []            # the inventory's own projects are added by cmd_status
    raise UsageError("give --project NAME, --all or --inventory FILE")


def cmd_status(args: argparse.Namespace) -> int:
    from .status import row

    idents = _selected(args)
    rows = [row(i) for i in idents]
    if args.inventory:
        from .inventory import load_inventory

        seen = {r["name"] for r in rows}
        for ident in load_inventory(args.inventory).identities(os.environ):
            if ident.name not in seen:
                rows.append(row(ident))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_table(rows))
    return EXIT_OK if all(r["healthy"] for r in rows) else EXIT_UNHEALTHY


def _table(rows: list[dict]) -> str:
    if not rows:
        return "no mqttd instances found"
    cols = [("NAME", "name"), ("STATE", "state"), ("PID", "pid"), ("UP", "uptime_s"), ("CONN", "connected"),
            ("LAST MSG", "last_message_age_s"), ("RATE/s", "rate_1m"), ("BACKLOG", "backlog"),
            ("DEAD", "dead_letters"), ("RECONN", "reconnects"), ("GAPS", "session_gaps"),
            ("CANARY", "canary_age_s"), ("HEALTH", "reason")]

    def fmt(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.1f}"
        return str(v)

    table = [[h for h, _ in cols]] + [[fmt(r[k]) for _, k in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def cmd_health(args: argparse.Namespace) -> int:
    from .status import row

    r = row(_identity(args))
    print(f"{r['name']}: {'healthy' if r['healthy'] else 'unhealthy'}: {r['reason']}")
    return EXIT_OK if r["healthy"] else EXIT_UNHEALTHY


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import replay

    identity = _identity(args)
    return replay(identity, _config(args, identity), ids=args.ids, topic=args.topic, since=args.since,
                  dry_run=args.dry_run)


def cmd_deploy(args: argparse.Namespace) -> int:
    from .deploy import deploy

    return deploy(args)


def cmd_recover(args: argparse.Namespace) -> int:
    from .recover import recover

    return recover(args)


HANDLERS = {"run": cmd_run, "check": cmd_check, "status": cmd_status, "health": cmd_health,
            "replay": cmd_replay, "deploy": cmd_deploy, "recover": cmd_recover}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(_normalise(argv))
        if not args.command:
            build_parser().print_help()
            return EXIT_USAGE
        return HANDLERS[args.command](args)
    except MqttdError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - unexpected: one line, traceback only on request
        print(f"mqttd: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("MQTTD_DEBUG"):
            traceback.print_exc()
        return 1
