#!/usr/bin/env python3
"""Where a UDP echo's added round-trip time goes: wake-ups, syscalls and CPU per round trip.

    sudo .venv/bin/python bench/echo_latency.py --count 2000 --json bench/results/echo.json
    ... --paths direct            # only the P2P path
    ... --perf 25 --no-strace     # the 25 hottest symbols of each program (perf record)
    ... --delay 10                # one-way ms per WAN link (delaywire), as ztna bench --delay

The real programs in one `ztna.lab` (cone/cone, IPv4), as bench/datapath.py builds them:
`ztna intermediate` (relay node), `ztna connector` with a UDP service (conn node) and
`ztna agent --mode tun` (agent node), and a UDP echo server on the app node. Per path
(direct, then relay with the Connector's P2P port blocked and a fresh Agent), three windows
of `--count` sequential 64-byte round trips from the agent node to the service's virtual IP:

* **rtt** and **cpu**: p50 / p95 / p99 of the round trips with nothing attached, and the CPU
  µs per round trip of each program (utime+stime from /proc over the window). The added
  RTT against nebula and the underlay is `ztna bench`'s (same lab, one run); this script is
  for where ztna's own share goes.
* **syscalls**: `strace -c -f` attached to each program for one window: calls per round trip
  of the ones that mark a wake-up (`epoll_wait`/`epoll_pwait`; `epoll_pwait2` is a driver
  thread's) and of the packet I/O (`recvmmsg`, `sendmsg`, `read`, `write`, ...). strace
  slows every call, so this window's RTT is not reported; the counts are what it is for.

One wake-up of an asyncio program costs an `epoll_wait` return, the loop's bookkeeping and
whatever Python runs before the native call; fewer per round trip is the lever this measures.
Compare runs taken side by side on the same machine: the lab shares its CPUs with everything
else running.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datapath import TICK, DataWorld, cpu_ticks, procs  # noqa: E402

from ztna.lab import Lab, LabConfig  # noqa: E402
from ztna.lab.config import unique_prefix  # noqa: E402
from ztna.worlds.lab_tun import PY, VIP4  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

ECHO_LOOP = (
    "import socket,sys,time,json\n"
    "host,port,n=sys.argv[1],int(sys.argv[2]),int(sys.argv[3])\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(1.0); s.connect((host,port))\n"
    "p=b'x'*64; out=[]; lost=0\n"
    "for _ in range(20):\n"
    " s.send(p)\n"
    " try: s.recv(2048)\n"
    " except OSError: pass\n"
    "for i in range(n):\n"
    " t=time.perf_counter(); s.send(p)\n"
    " try:\n"
    "  while s.recv(2048)!=p: pass\n"
    "  out.append(time.perf_counter()-t)\n"
    " except OSError: lost+=1\n"
    "print(json.dumps({'rtt':out,'lost':lost}))\n"
)

SYSCALLS = ("epoll_wait", "epoll_pwait", "epoll_pwait2", "recvmmsg", "recvmsg", "recvfrom", "sendmsg", "sendmmsg",
            "sendto", "read", "write", "writev", "readv")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def echo(world: DataWorld, host: str, port: int, count: int) -> dict[str, Any]:
    r = world.lab.run("agent", [PY, "-c", ECHO_LOOP, host, str(port), str(count)], check=False,
                      timeout=count * 2 + 60)
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": r.stderr[-300:]}
    rtt = [x * 1000 for x in info["rtt"]]
    return {"p50_ms": round(pct(rtt, 0.5), 4), "p95_ms": round(pct(rtt, 0.95), 4),
            "p99_ms": round(pct(rtt, 0.99), 4), "lost": info["lost"], "n": len(rtt)}


def parse_strace(text: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m:
            calls[m.group(2)] = calls.get(m.group(2), 0) + int(m.group(1))
    return calls


def syscall_window(world: DataWorld, port_host: str, count: int) -> dict[str, Any]:
    tracers = {}
    for role, pid in procs(world).items():
        out = world.workdir / f"strace-{role}-{pid}.txt"
        tracers[role] = (subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
    time.sleep(1.0)
    res = echo(world, port_host, 7, count)
    n = max(res.get("n", 0), 1)
    per: dict[str, Any] = {}
    for role, (p, out) in tracers.items():
        p.send_signal(2)
        p.wait(timeout=20)
        calls = parse_strace(out.read_text() if out.exists() else "")
        per[role] = {k: round(v / n, 2) for k, v in sorted(calls.items()) if k in SYSCALLS}
    return {"per_round_trip": per, "round_trips": n}


def perf_window(world: DataWorld, count: int, top: int) -> dict[str, Any]:
    """`perf record` of each program over one window: the hottest symbols (self time)."""
    recs = {}
    for role, pid in procs(world).items():
        data = world.workdir / f"perf-{role}-{pid}.data"
        recs[role] = (subprocess.Popen(["perf", "record", "-q", "-F", "4999", "-o", str(data), "-p",
                                        str(pid)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL), data)
    time.sleep(1.0)
    echo(world, VIP4, 7, count)
    out: dict[str, Any] = {}
    for role, (p, data) in recs.items():
        p.send_signal(2)
        p.wait(timeout=60)
        r = subprocess.run(["perf", "report", "-q", "--stdio", "--no-children", "-i", str(data),
                            "--sort", "dso,sym", "--percent-limit", "0.5"], capture_output=True,
                           text=True, timeout=120)
        out[role] = [" ".join(line.split()) for line in r.stdout.splitlines() if line.strip()][:top]
    return out


def cpu_window(world: DataWorld, count: int) -> dict[str, Any]:
    pids = procs(world)
    c0 = {k: cpu_ticks(p) for k, p in pids.items()}
    res = echo(world, VIP4, 7, count)
    n = max(res.get("n", 0), 1)
    res["cpu_us_per_round_trip"] = {k: round(1e6 * (cpu_ticks(p) - c0[k]) / TICK / n, 1)
                                    for k, p in pids.items()}
    return res


def run(lab: Lab, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    world = DataWorld(lab, work / "world", work / "probe")
    (work / "probe").mkdir(exist_ok=True)
    out: dict[str, Any] = {}
    try:
        world.start_infra(work / "www")
        for path in args.paths:
            if path == "relay":
                lab.block_udp("conn", 4434, direction="both")
            world.start_agent("stream")
            world.roles["agent"] = world.agent  # type: ignore[assignment]
            world.wait(path, timeout=40)
            time.sleep(1.0)
            res: dict[str, Any] = {}
            res["rtt"] = cpu_window(world, args.count)
            if not args.no_strace:
                res["syscalls"] = syscall_window(world, VIP4, min(args.count, 1000))
            if args.perf:
                res["perf"] = perf_window(world, min(args.count, 2000), args.perf)
            status = world.status() or {}
            res["final_path"] = (status.get("services") or [{}])[0].get("path")
            # The TUN pump's own counters (reads, packets left to Python, its thread's
            # wake-ups of Python) over the whole path's windows.
            res["agent_tun_native"] = (status.get("tun") or {}).get("native")
            print(f"[{path}] {json.dumps(res)}", flush=True)
            out[path] = res
            world.stop_agent()
        if "relay" in args.paths:
            lab.unblock_udp("conn", 4434)
    finally:
        world.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--paths", default="direct,relay")
    ap.add_argument("--delay", type=float, default=0.0, help="one-way ms per WAN link")
    ap.add_argument("--no-strace", action="store_true")
    ap.add_argument("--perf", type=int, default=0, metavar="N",
                    help="also perf record each program for a window: its N hottest symbols")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.paths = args.paths.split(",")
    work = Path(tempfile.mkdtemp(prefix="ztna-echo-"))
    (work / "www").mkdir()
    out: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
        "count": args.count, "delay_ms": args.delay,
        "load": Path("/proc/loadavg").read_text().split()[:3],
    }
    cfg = LabConfig(prefix=unique_prefix(), nat_a="cone", nat_b="cone", ip="4", delay_ms=args.delay)
    with Lab(cfg) as lab:
        out["paths"] = run(lab, work, args)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
