"""File descriptors, threads and RSS of every tenant daemon over a soak, read from /proc.

A leak shows as growth over one process's life, so samples are kept per (tenant, pid): a daemon
the soak kills is replaced by a new pid with its own series. The verdict looks at each process
that lived through at least MIN_SAMPLES samples, from its second sample on (the first may catch
it still starting up), and calls growth past the limits below a leak.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIN_SAMPLES = 4
FD_GROWTH_LIMIT = 8          # broker/DB reconnects may hold a socket or two for a moment
THREAD_GROWTH_LIMIT = 2


@dataclass
class Series:
    tenant: str
    pid: int
    fds: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)

    def growth(self) -> tuple[int, int]:
        """(fd growth, thread growth) from the second sample to the largest later one."""
        return max(self.fds[1:]) - self.fds[1], max(self.threads[1:]) - self.threads[1]


def read_proc(pid: int) -> tuple[int, int, int] | None:
    """(open fds, threads, RSS kB) of ``pid``, or None if it is gone."""
    try:
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        return fds, int(fields["Threads"]), int(fields["VmRSS"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


class ResourceSampler:
    def __init__(self) -> None:
        self.series: dict[tuple[str, int], Series] = {}

    def sample(self, pids: dict[str, int | None]) -> None:
        for tenant, pid in pids.items():
            values = read_proc(pid) if pid else None
            if values is None:
                continue
            s = self.series.setdefault((tenant, pid), Series(tenant, pid))
            s.fds.append(values[0])
            s.threads.append(values[1])
            s.rss_kb.append(values[2])

    def longest(self) -> dict[str, Series]:
        """Each tenant's longest-sampled process."""
        out: dict[str, Series] = {}
        for s in self.series.values():
            if s.tenant not in out or len(s.fds) > len(out[s.tenant].fds):
                out[s.tenant] = s
        return out

    def leaks(self) -> list[str]:
        out = []
        for s in self.series.values():
            if len(s.fds) < MIN_SAMPLES:
                continue
            fd_growth, thread_growth = s.growth()
            if fd_growth > FD_GROWTH_LIMIT or thread_growth > THREAD_GROWTH_LIMIT:
                out.append(f"{s.tenant} pid {s.pid}: fds {s.fds[1]} -> {max(s.fds[1:])}, "
                           f"threads {s.threads[1]} -> {max(s.threads[1:])} over {len(s.fds)} samples")
        return out

    def table_rows(self) -> list[list[object]]:
        rows = []
        for tenant, s in self.longest().items():
            rows.append([tenant, s.pid, len(s.fds), f"{s.fds[0]}/{max(s.fds)}/{s.fds[-1]}",
                         f"{s.threads[0]}/{max(s.threads)}/{s.threads[-1]}",
                         f"{s.rss_kb[0] / 1024:.0f}/{max(s.rss_kb) / 1024:.0f}/{s.rss_kb[-1] / 1024:.0f}"])
        return rows
