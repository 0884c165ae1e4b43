"""Warm-up of the direct path: p50/p95 over N lab runs (root).

    python bench/p2p_warmup.py --runs 20 --delay 10 --json bench/p2p_warmup.json

Each run builds a fresh cone/cone lab, starts Intermediate + Connector + Agent, and reads
the Agent's status: `warmup_ms` (start of the punch → first byte received on the direct
path) and the per-phase times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from ztna.lab import Lab, LabConfig
from ztna.lab.config import unique_prefix
from ztna.worlds.lab_udp import wait_path, ztna_world


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--delay", type=int, default=10)
    ap.add_argument("--ip", default="4")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    runs = []
    failures = []
    for i in range(a.runs):
        with tempfile.TemporaryDirectory() as tmp, \
                Lab(LabConfig(prefix=unique_prefix(), nat_a="cone", nat_b="cone", ip=a.ip,
                              delay_ms=a.delay)).up() as lab:
            with ztna_world(lab, Path(tmp)) as world:
                try:
                    snap = wait_path(world, "direct", timeout=60)
                except AssertionError as exc:  # reported, not hidden: counted as a failed run
                    failures.append(str(exc)[:300])
                    print(f"run {i + 1:2d}: FAILED {str(exc)[:200]}", flush=True)
                    continue
                p2p = snap["p2p"]["services"]["web"]
                runs.append({"warmup_ms": snap["warmup_ms"], "phases_ms": p2p["phases_ms"]})
                print(f"run {i + 1:2d}: warmup {snap['warmup_ms']:7.1f} ms  {p2p['phases_ms']}",
                      flush=True)
    phases = list(runs[0]["phases_ms"])
    rows = [("warmup", [r["warmup_ms"] for r in runs])]
    rows += [(p, [r["phases_ms"][p] for r in runs if p in r["phases_ms"]]) for p in phases]
    print(f"\n{'phase (ms from punch start)':28s} {'p50':>8s} {'p95':>8s} {'min':>8s} {'max':>8s}")
    summary = {}
    for name, vals in rows:
        summary[name] = {"p50": pct(vals, 0.5), "p95": pct(vals, 0.95), "min": min(vals),
                         "max": max(vals), "mean": statistics.mean(vals)}
        s = summary[name]
        print(f"{name:28s} {s['p50']:8.1f} {s['p95']:8.1f} {s['min']:8.1f} {s['max']:8.1f}")
    print(f"runs: {len(runs)} direct, {len(failures)} failed")
    if a.json:
        a.json.write_text(json.dumps({"runs": runs, "summary": summary, "failures": failures, "delay_ms": a.delay,
                                      "ip": a.ip}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
