"""The soak's accounting: what each tenant's database holds against what the broker confirmed,
losses and duplicates attributed to the faults, and the verdict.

A message confirmed by the broker (PUBACK) and neither stored nor dead-lettered is lost. A loss
whose PUBACK came within ``autosave + margin`` seconds before a broker SIGKILL is outside the
delivery promise (the broker's own durability: it had not saved the message yet) and is counted
apart; every other loss is a failure. Duplicates on the route with a dedupe key are a failure too.
"""
from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from typing import Any

from .faults import LABELS, Fault
from .pub import DEDUPE_ROUTES, ROUTES, SoakPublisher

OUTSIDE = "outside the promise: broker SIGKILL inside its autosave window"
STEADY = "steady state (no fault)"


def _faults_for(faults: list[Fault], tenant: str, t: float, slack: float) -> Fault | None:
    """The latest fault touching ``tenant`` whose window holds ``t``."""
    best = None
    for f in faults:
        lo, hi = f.window(slack)
        if tenant in f.tenants and lo <= t <= hi and (best is None or f.t_inject > best.t_inject):
            best = f
    return best


def collect(tenant: str, db, pub: SoakPublisher, faults: list[Fault], autosave: float, margin: float) -> dict[str, Any]:  # noqa: ANN001
    s = pub.streams[tenant]
    s.resolve()
    rows = db.query("select source, seq, extract(epoch from received_at) from sensors_reading "
                    "where source in ('soak', 'soakd', 'soakb') order by id")
    stored: Counter = Counter()
    extra_at: list[tuple[str, float]] = []                 # (route, time) of every copy after the first
    for source, seq, at in rows:
        key = (source, int(seq))
        stored[key] += 1
        if stored[key] > 1:
            extra_at.append((source, float(at)))
    dls: Counter = Counter()
    dl_extra_at: list[float] = []
    for payload, at in db.query("select payload, extract(epoch from created_at) from mqttd_deadletter "
                                "where topic like 'soak%%' order by id"):
        body = json.loads(bytes(payload))
        key = (body["route"], int(body["seq"]))
        dls[key] += 1
        if dls[key] > 1:
            dl_extra_at.append(float(at))

    confirmed, fails = dict(s.confirmed), s.fails
    lost = {k: t for k, t in confirmed.items() if k not in stored and k not in dls}
    kills = [f for f in faults if f.kind == "broker_kill" and tenant in f.tenants]   # mosquitto's tenants only
    outside, covered = {}, {}
    for k, t in lost.items():
        if any(f.t_inject - autosave - margin <= t <= f.t_inject + 0.5 for f in kills):
            outside[k] = t
        else:
            covered[k] = t

    per_fault = {id(f): {"lost": 0, "outside": 0, "dup_nokey": 0, "dup_key": 0} for f in faults}
    steady = {"lost": 0, "outside": 0, "dup_nokey": 0, "dup_key": 0}

    def bucket(t: float, slack: float) -> dict[str, int]:
        f = _faults_for(faults, tenant, t, slack)
        return per_fault[id(f)] if f else steady

    for t in covered.values():
        bucket(t, 5.0)["lost"] += 1
    for t in outside.values():
        f = min((f for f in kills if f.t_inject - autosave - margin <= t <= f.t_inject + 0.5),
                key=lambda f: f.t_inject)
        per_fault[id(f)]["outside"] += 1
    for route, t in extra_at:
        bucket(t, 1.0)["dup_key" if route in DEDUPE_ROUTES else "dup_nokey"] += 1

    nokey = [r for r in ROUTES if r not in DEDUPE_ROUTES]
    dl_expected = {k for k in confirmed if k in fails}
    return {
        "tenant": tenant,
        "published": len(confirmed),
        "handed_to_paho": s.n,
        "refused_by_paho": s.refused,
        "unconfirmed": len(s.pending),
        "stored": len(stored),
        "stored_unconfirmed": sum(1 for k in stored if k not in confirmed),
        "lost": len(lost),
        "lost_covered": len(covered),
        "lost_outside": len(outside),
        "dup_nokey": sum(c - 1 for (r, _), c in stored.items() if r in nokey),
        "dup_key": sum(c - 1 for (r, _), c in stored.items() if r in DEDUPE_ROUTES),
        "dl_expected": len(dl_expected),
        "dl_got": len(dl_expected & set(dls)),
        "dl_unexpected": sorted(k for k in dls if k not in fails),
        "dl_dups": sum(c - 1 for c in dls.values()),
        "dl_dup_at": dl_extra_at,
        "dup_at": sorted(t for r, t in extra_at if r not in DEDUPE_ROUTES),
        "lost_covered_keys": sorted(covered.items())[:50],
        "lost_outside_keys": sorted(outside.items())[:50],
        "per_fault": per_fault,
        "steady": steady,
        "publisher_connects": s.connects,
    }


def by_kind(faults: list[Fault], tenants: list[dict[str, Any]], fail_fraction: float) -> list[dict[str, Any]]:
    out = []
    kinds = [k for k in LABELS if any(f.kind == k for f in faults)]
    for kind in kinds:
        fs = [f for f in faults if f.kind == kind]
        rec = [f.recovery_s for f in fs if f.recovery_s is not None]
        sums = {x: sum(t["per_fault"][id(f)][x] for f in fs for t in tenants if id(f) in t["per_fault"])
                for x in ("lost", "outside", "dup_nokey", "dup_key")}
        out.append({"kind": kind, "label": LABELS[kind], "injected": len(fs), **sums,
                    "not_recovered": sum(1 for f in fs if f.recovery_s is None),
                    "recovery_median_s": round(statistics.median(rec), 1) if rec else None,
                    "recovery_max_s": round(max(rec), 1) if rec else None})
    dl_exp = sum(t["dl_expected"] for t in tenants)
    out.append({"kind": "raising_handler", "label": f"raising handler ({fail_fraction:.1%} of messages)",
                "injected": dl_exp, "lost": dl_exp - sum(t["dl_got"] for t in tenants), "outside": 0,
                "dup_nokey": sum(t["dl_dups"] for t in tenants), "dup_key": 0, "not_recovered": 0,
                "recovery_median_s": None, "recovery_max_s": None})
    steady = {x: sum(t["steady"][x] for t in tenants) for x in ("lost", "outside", "dup_nokey", "dup_key")}
    out.append({"kind": "steady", "label": STEADY, "injected": None, **steady, "not_recovered": 0,
                "recovery_median_s": None, "recovery_max_s": None})
    return out


def failures(tenants: list[dict[str, Any]], kinds: list[dict[str, Any]], anomalies: list[dict[str, Any]]) -> list[str]:
    out = []
    for t in tenants:
        if t["lost_covered"]:
            out.append(f"{t['tenant']}: {t['lost_covered']} confirmed messages lost (covered by the promise): "
                       f"{t['lost_covered_keys'][:10]}")
        if t["dup_key"]:
            out.append(f"{t['tenant']}: {t['dup_key']} duplicates on the route with a dedupe key")
        if t["dl_unexpected"]:
            out.append(f"{t['tenant']}: {len(t['dl_unexpected'])} good messages dead-lettered: {t['dl_unexpected'][:10]}")
    for k in kinds:
        if k["not_recovered"]:
            out.append(f"{k['label']}: {k['not_recovered']} of {k['injected']} not recovered")
    for a in anomalies:
        if a["state"] == "FATAL":
            out.append(f"{a['tenant']}: {a['what']}")
    return out


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cells[1:]])


def tenant_table(tenants: list[dict[str, Any]]) -> str:
    return table(["tenant", "published", "stored", "lost", "lost*", "dup no-key", "dup key", "DL exp", "DL got",
                   "DL dup"],
                  [[t["tenant"], t["published"], t["stored"], t["lost_covered"], t["lost_outside"], t["dup_nokey"],
                    t["dup_key"], t["dl_expected"], t["dl_got"], t["dl_dups"]] for t in tenants])


def fault_table(kinds: list[dict[str, Any]]) -> str:
    def rec(k: dict[str, Any]) -> str | None:
        if k["recovery_median_s"] is None:
            return None
        return f"{k['recovery_median_s']:.1f} / {k['recovery_max_s']:.1f}"

    return table(["fault", "injected", "lost", "lost*", "dup no-key", "dup key", "recovery s (median / max)"],
                  [[k["label"], k["injected"], k["lost"], k["outside"] if k["kind"] == "broker_kill" else None,
                    k["dup_nokey"], k["dup_key"], rec(k) if not k["not_recovered"] else
                    f"{k['not_recovered']} NOT RECOVERED"] for k in kinds])


def json_safe(tenants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in tenants:
        t = {k: v for k, v in t.items() if k not in ("per_fault", "dl_dup_at", "dup_at")}
        t["lost_covered_keys"] = [[r, s, at] for (r, s), at in t["lost_covered_keys"]]
        t["lost_outside_keys"] = [[r, s, at] for (r, s), at in t["lost_outside_keys"]]
        t["dl_unexpected"] = [list(k) for k in t["dl_unexpected"]]
        out.append(t)
    return out


_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) mqttd\[[^]]*\] pid=(\d+) [^:]*: (.*)$")


def log_events(path) -> dict[str, Any]:  # noqa: ANN001
    """What one tenant's mqttd.log says about its connections over the whole run (every process)."""
    import time as _time

    ev: dict[str, Any] = {"starts": 0, "connects": 0, "disconnects": [], "session_gaps": 0, "errors": []}
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return ev
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        at = _time.mktime(_time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        level, pid, msg = m.group(3), int(m.group(4)), m.group(5)
        if " starting: project " in msg:
            ev["starts"] += 1
        elif msg.startswith("connected to "):
            ev["connects"] += 1
        elif msg.startswith("disconnected from broker: ") or "retrying with backoff" in msg:
            ev["disconnects"].append([at, pid, msg[:160]])
        elif "session_present=False" in msg:
            ev["session_gaps"] += 1
        if level in ("ERROR", "CRITICAL") and len(ev["errors"]) < 40:
            ev["errors"].append([at, pid, msg[:300]])
    return ev


def timeline(times: list[float], t0: float, step: float = 5.0) -> list[list[float]]:
    """[[offset_s, count], ...] of ``times`` in ``step``-second buckets from ``t0``."""
    out: dict[float, int] = {}
    for t in times:
        b = round((t - t0) // step * step, 1)
        out[b] = out.get(b, 0) + 1
    return [[b, n] for b, n in sorted(out.items())]


ACCOUNTS = ("handled", "dead_letters", "duplicates_skipped", "unrouted", "canary", "in_flight")


class AccountsCheck:
    """The accounting of docs/operations.md on every tenant, all run long: each `mqttd status --json` row the soak reads must
    satisfy received = handled + dead_letters + duplicates_skipped + unrouted + canary + in_flight
    (per process: a daemon the soak kills starts counting again from 0)."""

    def __init__(self, tenants: list[str]) -> None:
        self.tenants = tenants
        self.samples: Counter = Counter()
        self.bad: list[tuple[str, dict[str, Any]]] = []
        self.last: dict[str, dict[str, Any]] = {}

    def observe(self, rows: dict[str, dict[str, Any]]) -> None:
        for t in self.tenants:
            row = rows.get(t)
            if not row or row.get("pid") is None or "in_flight" not in row:
                continue                          # not running, or no status written yet
            self.samples[t] += 1
            self.last[t] = row
            settled = sum(int(row.get(k) or 0) for k in ACCOUNTS)
            if row.get("received") != settled or int(row.get("in_flight") or 0) < 0:
                self.bad.append((t, {k: row.get(k) for k in ("pid", "received", *ACCOUNTS)}))

    def failures(self) -> list[str]:
        out = [f"{t}: accounting does not add up: {row}" for t, row in self.bad[:10]]
        out += [f"{t}: accounting never checked (no status row)" for t in self.tenants if not self.samples[t]]
        return out

    def rows(self) -> list[list[Any]]:
        return [[t, self.samples[t], sum(1 for x, _ in self.bad if x == t),
                 *(self.last.get(t, {}).get(k) for k in ("received", *ACCOUNTS))] for t in self.tenants]

    def table(self) -> str:
        return table(["tenant", "snapshots", "not adding up", "received", *ACCOUNTS], self.rows())
