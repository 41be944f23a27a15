"""The soak's end: the per-tenant and per-fault tables, the resource and accounting tables, the
notes and the verdict on stdout, and the same as JSON (--json). ``finish`` returns the exit code."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import report
from .env import Stack
from .faults import FaultRunner
from .pub import SoakPublisher
from .resources import FD_GROWTH_LIMIT, THREAD_GROWTH_LIMIT, ResourceSampler


def finish(a: argparse.Namespace, stack: Stack, pub: SoakPublisher, runner: FaultRunner, t0: float,
           sampler: ResourceSampler, accounts: report.AccountsCheck) -> int:
    tenants = [report.collect(t, stack.dbs[t], pub, runner.faults, a.autosave, a.attribution_margin)
               for t in stack.tenants]
    kinds = report.by_kind(runner.faults, tenants, a.fail_fraction)
    accounts.observe(stack.status())          # the end state of every tenant
    fails = (report.failures(tenants, kinds, runner.anomalies) + [f"resource growth: {x}" for x in sampler.leaks()]
             + accounts.failures())
    events = {t: report.log_events(stack.mqttd_log(t)) for t in stack.tenants}
    dropped = [line for line in stack.broker.log().splitlines() if "being dropped" in line]
    outside = sum(t["lost_outside"] for t in tenants)
    print()
    print(f"mqttd soak: {len(stack.tenants)} tenants, {a.duration:g}s at {a.rate:g} msg/s per tenant, "
          f"{len(runner.faults)} faults, PostgreSQL {'private cluster' if stack.pg else 'shared server'}"
          + (f", tenant {stack.cluster_tenant} on a 3-node NATS cluster at {a.cluster_rate:g} msg/s"
             if stack.cluster else ""))
    print()
    print(report.tenant_table(tenants))
    print()
    print(report.fault_table(kinds))
    print()
    print(report.table(["tenant", "pid", "samples", "fds first/max/last", "threads", "RSS MB"], sampler.table_rows()))
    print(f"(each tenant's longest-lived daemon, sampled every 10 s; growth past {FD_GROWTH_LIMIT} fds or "
          f"{THREAD_GROWTH_LIMIT} threads fails the soak)")
    print()
    print(accounts.table())
    print("(every `status --json` row read during the run and at its end: received = handled + dead_letters + "
          "duplicates_skipped + unrouted + canary + in_flight; a row that does not add up fails the soak)")
    print()
    print("lost = confirmed by the broker (PUBACK), then neither stored nor dead-lettered; covered by the promise.")
    print(f"lost* = {report.OUTSIDE} "
          f"(PUBACK within {a.autosave}+{a.attribution_margin:g}s before the kill): {outside}")
    print("dup key = duplicates on the route with a dedupe key (must be 0); DL = dead letters.")
    for note in (stack.pg_note, a.cluster_note):
        if note:
            print(f"note: {note}")
    if dropped:
        print(f"broker log: {len(dropped)} 'messages are being dropped' lines (max_queued_messages too small)")
    print("mqttd.log, all processes of the run: " + "; ".join(
        f"{t} {e['starts']} starts, {e['connects']} connects, {len(e['disconnects'])} disconnects, "
        f"{e['session_gaps']} session gaps" for t, e in events.items()))
    for t in tenants:
        if t["steady"]["dup_nokey"]:
            print(f"{t['tenant']}: duplicates outside every fault window, by time (+s: n): " + ", ".join(
                f"+{b:g}: {n}" for b, n in report.timeline([x for x in t["dup_at"] if not any(
                    f.window(1.0)[0] <= x <= f.window(1.0)[1] for f in runner.faults if t["tenant"] in f.tenants)],
                    t0)))
    for an in runner.anomalies:
        print(f"ANOMALY {an['tenant']} at {time.strftime('%H:%M:%S', time.localtime(an['time']))}: {an['what']}")
        for line in an["log_tail"][-8:]:
            print(f"    {line}")
    for f in runner.faults:
        if f.recovery_s is None:
            print(f"NOT RECOVERED: {f.kind} {f.target or ''}: status {json.dumps(f.diagnostics.get('status'))[:2000]}")
            for t, lines in f.diagnostics.get("log_tail", {}).items():
                print(f"  {t} mqttd.log:\n    " + "\n    ".join(lines[-20:]))
    print()
    print("RESULT: " + ("FAIL\n  " + "\n  ".join(fails) if fails else "PASS (nothing lost that the promise covers)"))
    if a.json:
        Path(a.json).write_text(json.dumps({
            "config": {k: v for k, v in vars(a).items() if k != "json"},
            "postgres": "private" if stack.pg else "shared", "pg_note": stack.pg_note,
            "cluster": stack.cluster.hosts() if stack.cluster else None,
            "t0": t0, "tenants": report.json_safe(tenants), "faults_by_kind": kinds,
            "dup_timeline": {t["tenant"]: report.timeline(t["dup_at"], t0) for t in tenants},
            "mqttd_log_events": events,
            "faults": [{"kind": f.kind, "target": f.target, "t_inject": f.t_inject, "at_s": round(f.t_inject - t0, 1),
                        "t_end": f.t_end, "t_recovered": f.t_recovered, "node": f.node,
                        "recovery_s": f.recovery_s, "detail": f.detail, "diagnostics": f.diagnostics}
                       for f in runner.faults],
            "resources": [vars(x) for x in sampler.series.values()],
            "anomalies": runner.anomalies, "broker_dropped_lines": dropped,
            "accounts": {"rows": accounts.rows(), "not_adding_up": accounts.bad},
            "failures": fails, "passed": not fails}, indent=1, default=str))
    return 1 if fails else 0
