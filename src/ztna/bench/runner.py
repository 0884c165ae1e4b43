"""One ``ztna bench`` run: build the lab, run every row under a time budget, report.

Flow: ``Lab(LabConfig(prefix=..., nat_a, nat_b, delay, loss)).up()``; an echo server
(TCP 7000, UDP 7) on the app node for the whole run; then each selected row in turn.
A row gets ``SIGALRM`` after its budget; the alarm raises inside the row, whose scope
then stops its processes and undoes its lab changes. Whatever happens, the lab is torn
down in ``finally``. Results: ``BenchResult`` = rows + environment + warm-up figures.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ztna.bench import peers, ztna_rows
from ztna.bench.harness import (
    APP_TCP_ECHO,
    APP_UDP_ECHO,
    BenchContext,
    Row,
    RowError,
    tool_version,
    wait_echo,
)
from ztna.bench.lanops import PathAudit
from ztna.lab import Lab, LabConfig
from ztna.quic.endpoint import thread_enabled

log = logging.getLogger("ztna.bench")

RowFn = Callable[[BenchContext, Row], None]
# key -> (label, kind, function)
ROWS: dict[str, tuple[str, str, RowFn]] = {
    "lan": ("LAN: connector→app, no tunnel", "baseline", peers.run_lan_baseline),
    "underlay": ("underlay: agent→app via port forward, no tunnel", "baseline",
                 peers.run_underlay),
    "ztna-direct": ("ztna direct (P2P)", "ztna",
                    lambda c, r: ztna_rows.run_ztna(c, r, direct=True)),
    "ztna-relay": ("ztna via Intermediate", "ztna",
                   lambda c, r: ztna_rows.run_ztna(c, r, direct=False)),
    "nebula-direct": ("nebula direct", "peer", lambda c, r: peers.run_nebula(c, r, relay=False)),
    "nebula-relay": ("nebula via lighthouse relay", "peer",
                     lambda c, r: peers.run_nebula(c, r, relay=True)),
    "wireguard": ("wireguard-go (static endpoints)", "peer", peers.run_wireguard),
    "sshuttle": ("sshuttle (ssh to conn)", "peer", peers.run_sshuttle),
}


@dataclass(frozen=True, slots=True)
class BenchOptions:
    seconds: float = 10.0
    count: int = 200
    connects: int = 20
    directions: tuple[str, ...] = ("up", "down")
    nat_a: str = "cone"
    nat_b: str = "cone"
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    rows: tuple[str, ...] = tuple(ROWS)
    prefix: str = "ztb"
    keep_workdir: bool = False


class RowTimeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise RowTimeout("row time budget exceeded")


def row_budget(opts: BenchOptions) -> int:
    per_dir = opts.seconds + 20
    return int(120 + len(opts.directions) * per_dir + opts.count * 0.06 + opts.connects * 0.5)


def environment(lab_config: LabConfig) -> dict[str, Any]:
    import ztna

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "cpu_count": os.cpu_count(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "ztna_version": ztna.__version__,
        "git_commit": commit or None,
        # Two vCPUs are shared with everything else: a run is only as good as the machine
        # was idle (1, 5, 15-minute load averages as the run ended).
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "endpoint_thread": thread_enabled(),
        "lab": lab_config.to_dict(),
        "tools": {
            "iperf3": tool_version(["iperf3", "--version"]),
            "nebula": tool_version(["nebula", "-version"]),
            "wireguard-go": tool_version(["wireguard-go", "--version"]),
            "sshuttle": tool_version(["sshuttle", "--version"]),
            "sshd": tool_version(["ssh", "-V"]),
        },
    }


def other_benchmarks(repo_bench: str) -> dict[str, Any]:
    """Warm-up / reconnect figures other benchmarks wrote under ``bench/results``."""
    found: dict[str, Any] = {}
    for pattern in ("p2p_warmup*.json", "*reconnect*.json", "*0rtt*.json"):
        files = sorted(glob.glob(os.path.join(repo_bench, "results", pattern))
                       + glob.glob(os.path.join(repo_bench, pattern)), key=os.path.getmtime)
        if files:
            try:
                with open(files[-1]) as f:
                    found[os.path.basename(files[-1])] = json.load(f)
            except (OSError, json.JSONDecodeError) as exc:
                found[os.path.basename(files[-1])] = f"unreadable: {exc}"
    return found


def warmup_summary(rows: list[Row], repo_bench: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in rows:
        if r.kind == "ztna" and "warmup" in r.extra:
            out[f"{r.key} (this run)"] = r.extra["warmup"]
    others = other_benchmarks(repo_bench)
    if others:
        out.update({f"from bench/{k}": _short(v) for k, v in others.items()})
    if not any("reconnect" in k or "0rtt" in k for k in others):
        out["reconnect / 0-RTT"] = None
        out["reconnect note"] = ("no reconnect / 0-RTT results under bench/ yet; left null "
                                 "(not measured by ztna bench itself)")
    if not any(k.startswith("p2p_warmup") for k in others):
        out["p2p_warmup note"] = ("no bench/p2p_warmup*.json yet (python bench/p2p_warmup.py "
                                  "--json bench/p2p_warmup.json); only this run's figures above")
    return out


def _short(value: Any) -> Any:
    if isinstance(value, dict):
        keep = value.get("summary") or value.get("results") or value
        text = json.dumps(keep)
        return keep if len(text) < 1500 else f"see the file ({len(text)} chars of JSON)"
    return value


def run(opts: BenchOptions, progress: Callable[[str], None] = print,
        repo_bench: str | None = None) -> tuple[dict[str, Any], list[Row]]:
    unknown = [k for k in opts.rows if k not in ROWS]
    if unknown:
        raise RowError(f"unknown rows {unknown}; rows are {', '.join(ROWS)}")
    cfg = LabConfig(prefix=opts.prefix, nat_a=opts.nat_a, nat_b=opts.nat_b,
                    delay_ms=opts.delay_ms, loss_pct=opts.loss_pct)
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = [Row(key=k, label=ROWS[k][0], kind=ROWS[k][1]) for k in opts.rows]
    workdir = tempfile.mkdtemp(prefix="ztna-bench-")
    lab = Lab(cfg)
    t_run = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    try:
        progress(f"lab up: NAT {cfg.nat_a}/{cfg.nat_b}, delay {cfg.delay_ms} ms, "
                 f"loss {cfg.loss_pct} %")
        lab.up()
        ctx = BenchContext(lab=lab, workdir=workdir, seconds=opts.seconds, count=opts.count,
                           connects=opts.connects, directions=opts.directions,
                           audit=PathAudit(lab))
        echo = lab.spawn("app", [sys.executable, "-m", "ztna.bench.echo", "serve", "--tcp",
                                 str(APP_TCP_ECHO), "--udp", str(APP_UDP_ECHO)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_echo(lab, "conn", "10.2.0.20", APP_UDP_ECHO, None, 15)
        except RowError as exc:
            raise RowError(f"echo server on the app node did not start: {exc}") from exc
        budget = row_budget(opts)
        for row in rows:
            progress(f"row {row.key}: {row.label} ...")
            t = time.monotonic()
            signal.alarm(budget)
            try:
                ROWS[row.key][2](ctx, row)
                if row.status == "pending":
                    row.status = "ok"
            except (RowError, RowTimeout, subprocess.CalledProcessError,
                    subprocess.TimeoutExpired, OSError) as exc:
                row.status = "failed"
                detail = exc.stderr.strip()[-300:] if isinstance(
                    exc, subprocess.CalledProcessError) and exc.stderr else ""
                row.note = "; ".join(filter(None, [row.note, f"{exc} {detail}".strip()]))
            except Exception as exc:  # noqa: BLE001 - one row never aborts the run
                row.status = "failed"
                row.note = f"harness error: {type(exc).__name__}: {exc}"
                log.debug("row %s\n%s", row.key, traceback.format_exc())
            finally:
                signal.alarm(0)
            row.extra["row_seconds"] = round(time.monotonic() - t, 1)
            progress(f"row {row.key}: {row.status} "
                     f"up={row.tcp_up_mbps} down={row.tcp_down_mbps} "
                     f"tcp_p50={row.tcp_rtt_p50_ms} udp_p50={row.udp_rtt_p50_ms}"
                     + (f" ({row.note[:200]})" if row.note else ""))
        echo.terminate()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        try:
            lab.down()
        except Exception as exc:  # noqa: BLE001 - report, never mask the run's result
            progress(f"lab teardown problem: {exc}")
        if not opts.keep_workdir:
            subprocess.run(["rm", "-rf", workdir], check=False)
    bench_dir = repo_bench or default_bench_dir()
    result: dict[str, Any] = {
        "started": started,
        "duration_s": round(time.monotonic() - t_run, 1),
        "load_average_start": load_start,
        "settings": {"seconds": opts.seconds, "count": opts.count, "connects": opts.connects,
                     "directions": list(opts.directions), "rows": list(opts.rows)},
        "environment": environment(cfg),
        "rows": [r.to_dict() for r in rows],
        "ztna_warmup": warmup_summary(rows, bench_dir),
        "workdir": workdir if opts.keep_workdir else None,
    }
    from ztna.bench.report import added_udp_rtt, ratios

    result["ratios"] = ratios(rows)
    result["added_udp_rtt"] = added_udp_rtt(rows)
    return result, rows


def default_bench_dir() -> str:
    """``bench/`` at the repo root when running from a checkout, else ``./bench``."""
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.abspath(os.path.join(here, "..", "..", ".."))
    if os.path.exists(os.path.join(repo, "pyproject.toml")):
        return os.path.join(repo, "bench")
    return os.path.abspath("bench")
