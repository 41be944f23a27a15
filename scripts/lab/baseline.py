"""scripts/bench --baseline REV: an older commit's code beside this checkout's, in one run.

The older code runs from a throwaway ``git worktree`` of REV: its daemon is started with the
worktree first on PYTHONPATH and as its working directory (``python -m`` puts the working
directory first on sys.path, so that has to point at the same code), and with the worktree's own
sample tenant (tests/tenant) on the daemon's path and migrating its databases: the tenant changed
with the code. Nothing is copied; the worktree is removed at the end, even on failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import median


@dataclass(frozen=True)
class Code:
    """One side of the comparison: the checkout whose ``mqttd/`` and ``tests/tenant`` run."""

    label: str
    root: Path

    @property
    def tenant_dir(self) -> Path:
        return self.root / "tests" / "tenant"

    @property
    def env(self) -> dict[str, str]:
        """Both sides get their root first on PYTHONPATH, so both resolve ``mqttd`` the same way
        (the venv's editable install of this checkout comes after PYTHONPATH on sys.path)."""
        rest = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": f"{self.root}{os.pathsep}{rest}" if rest else str(self.root)}

    def where(self) -> str:
        """The files a daemon of this side imports, printed by the same interpreter with the same
        environment, working directory and tenant path as the daemon: the proof of which code runs."""
        probe = "import sys; sys.path.insert(0, sys.argv[1]); import mqttd, sensors; print(mqttd.__file__, sensors.__file__)"
        out = subprocess.run([sys.executable, "-c", probe, str(self.tenant_dir)], env={**os.environ, **self.env},
                             cwd=self.root,
                             capture_output=True, text=True, check=True).stdout.split()
        return f"mqttd {out[0]}, tenant {out[1]}"


def describe(repo: Path, rev: str) -> str:
    """``<short hash> <date> <subject>`` of a commit."""
    return subprocess.run(["git", "-C", str(repo), "log", "-1", "--date=short", "--format=%h %ad %s", rev],
                          capture_output=True, text=True, check=True).stdout.strip()


def dirty(repo: Path) -> list[str]:
    """Uncommitted changes under mqttd/ and tests/tenant: the new side runs the working tree."""
    out = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "mqttd", "tests/tenant"],
                         capture_output=True, text=True, check=True).stdout
    return [line[3:] for line in out.splitlines()]


@contextmanager
def worktree(repo: Path, rev: str) -> Iterator[Code]:
    """A detached worktree of ``rev`` in a temp dir, for the length of the block."""
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    parent = Path(tempfile.mkdtemp(prefix="mqttd-baseline-"))
    path = parent / sha
    try:
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(path), sha],
                       check=True)
        yield Code(f"old {sha}", path)
    finally:
        if path.exists():
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)], check=False)
        shutil.rmtree(parent, ignore_errors=True)


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return median(values), min(values), max(values)


def cell(values: list[float], fmt: str) -> str:
    m, lo, hi = spread(values)
    return f"{format(m, fmt)} ({format(lo, fmt)}-{format(hi, fmt)})"


def ratio_cell(old: list[float], new: list[float]) -> str:
    """new/old of the medians, and the lowest and highest ratio of one round (old and new of a
    round ran back to back)."""
    per_round = [n / o for o, n in zip(old, new, strict=True) if o]
    return f"{median(new) / median(old):.2f} ({min(per_round):.2f}-{max(per_round):.2f})"


def report(rows: dict[str, dict[str, list[dict]]], labels: tuple[str, str], latency: dict[str, list[dict]],
           idle: dict[str, list[float]] | None, idle_s: float) -> bool:
    """The side-by-side tables; True if every run stored every message."""
    old, new = labels
    print()
    print("medians of the rounds (lowest-highest round); new/old: of the medians (lowest-highest round)")
    print(f"{'case / db':24} | {'old msg/s':>24} | {'new msg/s':>24} | {'new/old':>17} | verified")
    ok = True
    for name, runs in rows.items():
        o, n = [r["rate"] for r in runs[old]], [r["rate"] for r in runs[new]]
        good = all(r["ok"] for r in runs[old] + runs[new])
        ok = ok and good
        print(f"{name:24} | {cell(o, ',.0f'):>24} | {cell(n, ',.0f'):>24} | {ratio_cell(o, n):>17} | "
              f"{'yes' if good else 'NO: LOST'}")
    if latency[old]:
        print()
        print(f"{'lone messages at 20/s':24} | {'old ms':>24} | {'new ms':>24} | {'new/old':>17} | stored")
        good = all(r["ok"] for r in latency[old] + latency[new])
        ok = ok and good
        for key in ("p50", "p99"):
            o, n = [r[key] for r in latency[old]], [r[key] for r in latency[new]]
            print(f"{'receipt -> PUBACK ' + key:24} | {cell(o, '.1f'):>24} | {cell(n, '.1f'):>24} | "
                  f"{ratio_cell(o, n):>17} | {'yes' if good else 'NO'}")
    if idle:
        o, n = idle[old], idle[new]
        print()
        print(f"idle: {len(o)} old and {len(n)} new daemons connected at once for {idle_s:.0f} s (canary every "
              f"10 s, status every 2 s); % of a core per daemon, median (lowest-highest daemon)")
        print(f"{'idle CPU %':24} | {cell(o, '.3f'):>24} | {cell(n, '.3f'):>24} | "
              f"{median(n) / median(o) if median(o) else float('nan'):>17.2f} |")
    return ok
