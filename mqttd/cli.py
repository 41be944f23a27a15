"""Command line: argv -> Config -> action. The only place an MqttdError becomes an exit code."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from mqttd import __version__
from mqttd.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE, MqttdError, UsageError

if TYPE_CHECKING:
    from mqttd.config import Config
    from mqttd.identity import Identity

COMMANDS = ("run", "check", "status", "health", "replay", "deploy", "recover", "assets")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        raise UsageError(f"mqttd: {message} (see mqttd --help)")


def _identity_args(p: argparse.ArgumentParser, required_project: bool = False) -> None:
    p.add_argument("--project", help="project name (else $MQTTD_PROJECT, else $PROJECT_NAME)")
    p.add_argument("--instance", help="instance number for numprocs scale-out (else $MQTTD_INSTANCE)")
    p.add_argument("--config", help="TOML config (else $MQTTD_CONFIG, else /etc/mqttd/PROJECT.toml)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``mqttd run``; ``python manage.py mqttd`` is built from this too."""
    _identity_args(p)
    p.add_argument("--daemonize", action="store_true", help="detach (never under Supervisor)")
    p.add_argument("--metrics-port", type=int,
                   help="serve /metrics and /healthz on this port (0: any free port; else [status] metrics_port)")
    p.add_argument("--metrics-host", help="address for the metrics endpoint (default 127.0.0.1)")
    p.add_argument("--log-level", default=os.environ.get("MQTTD_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (else $MQTTD_LOG_LEVEL, else INFO)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqttd", description="One supervised MQTT -> Django ORM ingestion daemon per project.",
                     epilog="`mqttd --project NAME [options]` is short for `mqttd run --project NAME [options]`; "
                            "`python manage.py mqttd` inside a Django project takes the same options. "
                            "`mqttd COMMAND --help` lists a command's options.")
    parser.add_argument("--version", action="version", version=f"mqttd {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("run", help="run the daemon in the foreground (what Supervisor starts)")
    add_run_arguments(p)

    p = sub.add_parser("check", help="validate config, handlers, broker and database; consume nothing")
    _identity_args(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")

    p = sub.add_parser("status", help="one row per instance")
    p.add_argument("--project", help="project name (else $MQTTD_PROJECT, else $PROJECT_NAME)")
    p.add_argument("--instance", help="instance number (else $MQTTD_INSTANCE)")
    p.add_argument("--all", action="store_true", help="every instance in the run dir")
    p.add_argument("--inventory", help="also list the inventory's projects that are not running")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("health", help="exit 0 healthy, 1 unhealthy (reason on stdout)")
    p.add_argument("--project", help="project name (else $MQTTD_PROJECT, else $PROJECT_NAME)")
    p.add_argument("--instance", help="instance number (else $MQTTD_INSTANCE)")

    p = sub.add_parser("replay", help="run dead letters again through their routes")
    _identity_args(p)
    p.add_argument("--id", type=int, action="append", dest="ids", help="only this dead letter (repeatable)")
    p.add_argument("--topic", help="only letters whose topic matches this filter")
    p.add_argument("--since", help="only letters created at or after this ISO time")
    p.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")

    p = sub.add_parser("deploy", help="write Supervisor conf.d entries from an inventory")
    p.add_argument("--inventory", required=True, help="the inventory TOML listing the projects")
    p.add_argument("--conf-dir", required=True, help="Supervisor's conf.d directory to write into")
    p.add_argument("--dry-run", action="store_true", help="show the changes; write nothing")
    p.add_argument("--apply", action="store_true", help="make supervisord reread and update")
    p.add_argument("--supervisor-url", help="supervisord's XML-RPC URL for --apply (else $SUPERVISOR_SERVER_URL, "
                   "else unix:///var/run/supervisor.sock)")

    p = sub.add_parser("recover", help="restart instances that are down or unhealthy, through Supervisor")
    p.add_argument("--inventory", required=True, help="the inventory TOML listing the projects")
    p.add_argument("--supervisor-url", help="supervisord's XML-RPC URL (else $SUPERVISOR_SERVER_URL, "
                   "else unix:///var/run/supervisor.sock)")
    p.add_argument("--dry-run", action="store_true", help="say what would be restarted; restart nothing")

    p = sub.add_parser("assets", help="print a shipped deployment asset (systemd, logrotate, alerts, dashboard)")
    p.add_argument("--list", action="store_true", help="list the assets (the default without NAME)")
    p.add_argument("name", nargs="?", metavar="NAME", help="the asset to print, e.g. systemd (see --list)")
    return parser


def _normalise(argv: list[str]) -> list[str]:
    """`mqttd --project X` means `mqttd run --project X`."""
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    return ["run", *argv]


def load_target(opts: Mapping[str, Any]) -> tuple[Identity, Config]:
    """The instance and its config, from ``--project``/``--instance``/``--config`` (else the
    environment), with ``--metrics-port``/``--metrics-host`` applied when given. One function for
    every command and for ``python manage.py mqttd``, so that they cannot read them differently."""
    from mqttd.config import config_path, load
    from mqttd.identity import from_args

    identity = from_args(opts.get("project"), opts.get("instance"), os.environ)
    config = load(config_path(opts.get("config"), identity, os.environ), os.environ)
    port, host = opts.get("metrics_port"), opts.get("metrics_host")
    if port is not None or host:
        import dataclasses

        st = dataclasses.replace(config.status, metrics_port=port if port is not None else config.status.metrics_port,
                                 metrics_host=host or config.status.metrics_host)
        config = dataclasses.replace(config, status=st)
    return identity, config


def run_daemon(opts: Mapping[str, Any], *, setup_django: bool = True) -> int:
    """``mqttd run`` and ``python manage.py mqttd`` (which has set Django up already)."""
    from mqttd.daemon import run as daemon

    identity, config = load_target(opts)

    def body() -> int:
        return daemon.run(identity, config, setup_django=setup_django, log_level=opts.get("log_level") or "INFO")

    if opts.get("daemonize"):
        if os.environ.get("SUPERVISOR_ENABLED"):
            print(f"mqttd[{identity.name}]: warning: --daemonize ignored under Supervisor "
                  "(it watches the pid it started)", file=sys.stderr)
        else:
            from mqttd.daemon.daemonize import detach

            return detach(identity, body)
    return body()


def cmd_run(args: argparse.Namespace) -> int:
    return run_daemon(vars(args))


def cmd_check(args: argparse.Namespace) -> int:
    from mqttd.ops.check import check

    identity, config = load_target(vars(args))
    return check(identity, config, timeout=args.timeout)


def _selected(args: argparse.Namespace):
    from mqttd.daemon.status import instances_in
    from mqttd.identity import derive, from_args

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
    from mqttd.daemon.status import row

    idents = _selected(args)
    rows = [row(i) for i in idents]
    if args.inventory:
        from mqttd.deploy.inventory import load_inventory

        seen = {r["name"] for r in rows}
        for ident in load_inventory(args.inventory).identities(os.environ):
            if ident.name not in seen:
                rows.append(row(ident))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_table(rows))
    return EXIT_OK if all(r["healthy"] for r in rows) else EXIT_UNHEALTHY


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "no mqttd instances found"
    cols = [("NAME", "name"), ("STATE", "state"), ("PID", "pid"), ("UP", "uptime_s"), ("CONN", "connected"),
            ("LAST MSG", "last_message_age_s"), ("RATE/s", "rate_1m"), ("BACKLOG", "backlog"),
            ("DEAD", "dead_letters"), ("RECONN", "reconnects"), ("GAPS", "session_gaps"),
            ("PUB GAPS", "publisher_gaps"),
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
    from mqttd.daemon.status import row
    from mqttd.identity import from_args

    r = row(from_args(args.project, args.instance, os.environ))
    print(f"{r['name']}: {'healthy' if r['healthy'] else 'unhealthy'}: {r['reason']}")
    return EXIT_OK if r["healthy"] else EXIT_UNHEALTHY


def cmd_replay(args: argparse.Namespace) -> int:
    from mqttd.ops.replay import replay

    identity, config = load_target(vars(args))
    return replay(identity, config, ids=args.ids, topic=args.topic, since=args.since,
                  dry_run=args.dry_run)


def cmd_deploy(args: argparse.Namespace) -> int:
    from mqttd.deploy.apply import deploy

    return deploy(args)


def cmd_recover(args: argparse.Namespace) -> int:
    from mqttd.ops.recover import recover

    return recover(args)


def cmd_assets(args: argparse.Namespace) -> int:
    """`mqttd assets [--list | NAME]`: the files of deploy/, as shipped inside the package."""
    from mqttd import assets

    if args.list or not args.name:
        sys.stdout.write(assets.listing())
        return EXIT_OK
    asset = assets.find(args.name)
    if asset is None:
        raise UsageError(f"mqttd: unknown asset {args.name!r}; choose one of: "
                         f"{', '.join(a.name for a in assets.ASSETS)} (mqttd assets --list)")
    sys.stdout.flush()
    sys.stdout.buffer.write(assets.read_bytes(asset))
    sys.stdout.buffer.flush()
    return EXIT_OK


HANDLERS = {"run": cmd_run, "check": cmd_check, "status": cmd_status, "health": cmd_health,
            "replay": cmd_replay, "deploy": cmd_deploy, "recover": cmd_recover,
            "assets": cmd_assets}


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
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - unexpected: one line, traceback only on request
        print(f"mqttd: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("MQTTD_DEBUG"):
            traceback.print_exc()
        return EXIT_FAILURE
