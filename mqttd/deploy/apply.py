"""`mqttd deploy`: inventory -> one Supervisor conf.d entry per project (docs/deployment.md).

Everything is checked before anything is touched: the inventory, each project's venv, config
and user, the generated files (by Supervisor's own parser), and the files already in the conf
dir. A file that mqttd deploy did not write is never overwritten or deleted, and a refusal
leaves the conf dir exactly as it was. Then: the log and run dirs, the files (each written
atomically), and with ``--apply`` supervisord's reread/update done over XML-RPC, program by
program, the way `supervisorctl update` does it.
"""
from __future__ import annotations

import argparse
import configparser
import difflib
import grp
import os
import pwd
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from mqttd.deploy import render as supervisor_conf
from mqttd.deploy.inventory import Inventory, Project, load_inventory
from mqttd.deploy.rpc import Supervisor
from mqttd.errors import EXIT_OK, DeployError, UsageError


@dataclass(frozen=True)
class Change:
    path: Path
    old: str | None          # None: a new file
    new: str | None          # None: a file to remove
    why: str


def deploy(args: argparse.Namespace) -> int:
    if args.dry_run and args.apply:
        raise UsageError("mqttd deploy: give --dry-run or --apply, not both")
    inventory = load_inventory(args.inventory)
    inventory.check_host(os.environ)
    conf_dir = Path(args.conf_dir)
    if not conf_dir.is_dir():
        raise DeployError(f"conf dir {conf_dir} does not exist (give the directory supervisord includes, "
                          "e.g. /etc/supervisor/conf.d)")
    rendered = {f"{p.program}.conf": supervisor_conf.render(p, inventory.path.resolve())
                for p in inventory.projects}
    supervisor_conf.validate(inventory.projects, inventory.path.resolve(), conf_dir)
    changes, unchanged = plan(conf_dir, rendered, inventory)
    dirs = _dirs(inventory)
    supervisor = None
    if args.apply:      # reachable before anything is touched
        supervisor = Supervisor.from_args(args.supervisor_url, os.environ)
        supervisor.get_state()
    if args.dry_run:
        for c in changes:
            sys.stdout.writelines(_diff(c))
        missing = [str(path) for path, *_ in dirs if not path.exists()]
        if missing:
            print(f"dry run: would create {', '.join(missing)}")
        print(f"dry run: {sum(c.new is not None for c in changes)} file(s) to write, "
              f"{sum(c.new is None for c in changes)} to remove, {len(unchanged)} unchanged; nothing was changed")
        return EXIT_OK
    for line in _make_dirs(dirs):
        print(line)
    for c in changes:
        _commit(c)
        print(f"{'removed' if c.new is None else 'wrote'} {c.path} ({c.why})")
    for path in unchanged:
        print(f"unchanged {path}")
    if supervisor is not None:
        dropped = {c.path.name[: -len(".conf")] for c in changes if c.new is None}
        apply(supervisor, inventory, conf_dir, dropped)
    elif changes:
        print("next: supervisorctl update (or run mqttd deploy again with --apply)")
    return EXIT_OK


# ---- the conf dir ---------------------------------------------------------------------------------
def plan(conf_dir: Path, rendered: dict[str, str], inventory: Inventory) -> tuple[list[Change], list[Path]]:
    """What to write and remove; DeployError if that would touch a file mqttd deploy did not write."""
    ours: dict[str, str] = {}
    foreign: dict[str, str | None] = {}
    for path in sorted(conf_dir.glob("*.conf")):
        try:
            text = path.read_text(encoding="utf-8") if path.is_file() else None
        except (OSError, UnicodeDecodeError):
            text = None
        if text is not None and not path.is_symlink() and supervisor_conf.is_generated(text):
            ours[path.name] = text
        else:
            foreign[path.name] = text
    programs = {p.program: p for p in inventory.projects}
    for name, text in foreign.items():
        if name in rendered:
            project = programs[name[: -len(".conf")]]
            raise DeployError(f"{conf_dir / name} was not written by mqttd deploy: refusing to overwrite it "
                              f"(move it away, or take {project.name} out of the inventory)")
        clash = _clash(text, programs) if text is not None else None
        if clash:
            raise DeployError(f"{conf_dir / name} already defines {clash}, which clashes with a program "
                              "mqttd deploy generates: rename one of them")
    changes: list[Change] = []
    unchanged: list[Path] = []
    for name, text in rendered.items():
        path = conf_dir / name
        old = ours.get(name)
        if old is not None and supervisor_conf.edited_by_hand(old):
            raise DeployError(f"{path} was edited by hand after mqttd deploy wrote it: refusing to overwrite "
                              "it (put the change into the inventory, then delete the file)")
        if old is None:
            changes.append(Change(path, None, text, "new"))
        elif old != text:
            changes.append(Change(path, old, text, "changed"))
        else:
            unchanged.append(path)
    for name in sorted(set(ours) - set(rendered)):
        path = conf_dir / name
        if supervisor_conf.edited_by_hand(ours[name]):
            raise DeployError(f"{path} was edited by hand after mqttd deploy wrote it: refusing to delete it "
                              "although its project left the inventory (delete it yourself)")
        changes.append(Change(path, ours[name], None, "no longer in the inventory"))
    return changes, unchanged


def _clash(text: str, programs: dict[str, Project]) -> str | None:
    """The section of a hand-written file that would collide with a generated program, if any."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        parser.read_string(text)
    except configparser.Error:
        return None      # not ours to judge: supervisord reports its own parse errors
    for section in parser.sections():
        kind, _, name = section.partition(":")
        if kind in ("program", "fcgi-program", "eventlistener", "group") and name.strip() in programs:
            return f"[{section}]"
        if kind == "group":
            members = parser.get(section, "programs", fallback="").replace(",", " ").split()
            for member in members:
                if member in programs:
                    return f"[{section}] with programs={member}"
    return None


def _diff(c: Change) -> list[str]:
    old = (c.old or "").splitlines(keepends=True)
    new = (c.new or "").splitlines(keepends=True)
    return list(difflib.unified_diff(old, new, fromfile="/dev/null" if c.old is None else str(c.path),
                                     tofile="/dev/null" if c.new is None else str(c.path)))


def _still_ours(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return not path.is_symlink() and supervisor_conf.is_generated(text) and not supervisor_conf.edited_by_hand(text)


def _commit(c: Change) -> None:
    """Write or remove one file. Re-checks ownership at the last moment: a file that appeared
    or changed hands since the plan is never clobbered (link() fails instead of replacing)."""
    if c.new is None:
        if not _still_ours(c.path):
            raise DeployError(f"{c.path} changed while deploying: left as it is")
        c.path.unlink()
        return
    tmp = c.path.with_name(f".{c.path.name}.{os.getpid()}.tmp")   # not *.conf: never included
    try:
        tmp.write_text(c.new, encoding="utf-8")
        os.chmod(tmp, 0o644)    # nothing secret inside, by construction
        if c.old is None:
            try:
                os.link(tmp, c.path)
            except FileExistsError:
                raise DeployError(f"{c.path} appeared while deploying: refusing to overwrite it") from None
        else:
            if not _still_ours(c.path):
                raise DeployError(f"{c.path} changed while deploying: refusing to overwrite it")
            os.replace(tmp, c.path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- log and run dirs -----------------------------------------------------------------------------
def _dirs(inventory: Inventory) -> list[tuple[Path, int, str | None]]:
    """(path, mode, owner) for every directory the projects need; owner None: left to root.

    The log root only holds per-project dirs, so it stays root's and traversable (0755); each
    project's log dirs and the run dir (lock and status files) are its user's, 0750.
    """
    seen: dict[Path, tuple[Path, int, str | None]] = {}
    for p in inventory.projects:
        seen.setdefault(p.log_dir, (p.log_dir, 0o755, None))
        seen.setdefault(p.run_dir, (p.run_dir, 0o750, p.user))
        for d in [p.supervisor_log_dir, *(i.log_dir for i in p.identities())]:
            seen.setdefault(d, (d, 0o750, p.user))
    return list(seen.values())


def _make_dirs(dirs: list[tuple[Path, int, str | None]]) -> list[str]:
    """Create missing dirs (owned by their project's user when running as root); report
    existing ones the user cannot write to. Existing dirs are never re-owned or re-moded."""
    lines = []
    root = os.geteuid() == 0
    for path, mode, owner in dirs:
        user = pwd.getpwnam(owner) if owner else None
        if not path.exists():
            try:
                path.mkdir(parents=True)
                os.chmod(path, mode)
                if root and user:
                    os.chown(path, user.pw_uid, user.pw_gid)
            except OSError as exc:
                raise DeployError(f"cannot create {path}: {exc.strerror}") from None
            who = f", owner {owner}" if root and user else ""
            lines.append(f"created {path} ({mode:04o}{who})")
            if user and not root and user.pw_uid != os.geteuid():
                lines.append(f"warning: not running as root, so {path} belongs to you, not to {owner}")
            if str(path).startswith(("/run/", "/var/run/")):
                who = f"{owner} {grp.getgrgid(user.pw_gid).gr_name}" if user else "root root"
                lines.append(f"note: {path} is on tmpfs and is gone after a reboot: add "
                             f"'d {path} {mode:04o} {who} -' to /etc/tmpfiles.d/mqttd.conf")
        elif user and not _writable_by(path, user):
            lines.append(f"warning: {path} exists but {owner} cannot write to it")
    return lines


def _writable_by(path: Path, user: pwd.struct_passwd) -> bool:
    st = path.stat()
    if user.pw_uid == 0 or (st.st_uid == user.pw_uid and st.st_mode & 0o200):
        return True
    groups = {g.gr_gid for g in _groups_of(user)} | {user.pw_gid}
    return bool((st.st_gid in groups and st.st_mode & 0o020) or st.st_mode & 0o002)


def _groups_of(user: pwd.struct_passwd) -> list:
    return [g for g in grp.getgrall() if user.pw_name in g.gr_mem]


# ---- supervisord ----------------------------------------------------------------------------------
def _runs_mqttd(command: str | None) -> bool:
    """True for a program whose command is a generated one (VENV/bin/mqttd run)."""
    try:
        argv = shlex.split(command or "")
    except ValueError:
        return False
    return len(argv) == 2 and argv[0].endswith("/bin/mqttd") and argv[1] == "run"


def apply(sup: Supervisor, inventory: Inventory, conf_dir: Path, dropped: set[str]) -> None:
    """Reread, then update only mqttd's programs, one line per action (`supervisorctl update`
    semantics: added -> add; changed -> stop, remove, add; removed -> stop, remove)."""
    before = {c["group"]: c["command"] for c in sup.get_all_config_info()}
    added, changed, removed = sup.reload_config()
    ours = {p.program for p in inventory.projects}
    known = {c["group"] for c in sup.get_all_config_info()}
    missing = sorted(ours - known)
    if missing:
        raise DeployError(f"supervisord does not know {missing[0]} after rereading its configuration: add "
                          f"'[include] files = {conf_dir.resolve()}/*.conf' to supervisord.conf")

    def managed(group: str) -> bool:
        return group in ours or group in dropped or _runs_mqttd(before.get(group))

    for group in removed:
        if managed(group):
            sup.stop_group(group)
            sup.remove_group(group)
            print(f"supervisord: removed {group} (stopped)")
    for group in changed:
        if managed(group):
            sup.stop_group(group)
            sup.remove_group(group)
            sup.add_group(group)
            print(f"supervisord: updated {group} (stopped, then started with the new configuration)")
    for group in added:
        if managed(group):
            sup.add_group(group)
            print(f"supervisord: added {group} (starting: autostart)")
    others = [g for g in [*added, *changed, *removed] if not managed(g)]
    if others:
        print(f"supervisord: left alone, not generated by mqttd deploy (use supervisorctl update): "
              f"{', '.join(sorted(others))}")
    if not any(managed(g) for g in [*added, *changed, *removed]):
        print("supervisord: already up to date")
