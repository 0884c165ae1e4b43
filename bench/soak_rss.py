#!/usr/bin/env python3
"""Agent RSS under sustained traffic: is it ≤ 50 MB, and flat, over a long soak?

    sudo .venv/bin/python bench/soak_rss.py                      # 10 minutes, direct path
    sudo .venv/bin/python bench/soak_rss.py --minutes 2 --path relay --json bench/results/soak.json

One `ztna.lab` (nat cone/cone, IPv4) with the real `ztna intermediate`, `ztna connector` and
`ztna agent --mode tun --tcp-transport datagram` (bench/datapath.py's world): for the whole
soak, curl downloads from the app's HTTP backend through the TUN (restarted whenever a
download ends) and a UDP sender offers `--udp-pps` datagrams per second to the echo backend
(echoes counted), so both carriages of the TUN path stay busy. Every `--interval` seconds the
Agent's VmRSS and VmHWM (peak) are read from /proc and printed; the JSON holds the series.

Verdict: the peak after `--warmup` seconds must stay ≤ `--limit-mb`, and "flat" means the
last quarter's mean exceeds the second quarter's by less than `--flat-mb` (a leak of a few
bytes per packet shows up here at these rates long before it is visible in a short run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datapath import FLOOD, PY, VIP4, DataWorld, rss_kb  # noqa: E402

from ztna.lab import Lab, LabConfig  # noqa: E402
from ztna.lab.config import unique_prefix  # noqa: E402
from ztna.procs import child_env  # noqa: E402
from ztna.worlds.lab_tun import World  # noqa: E402


def hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class SoakWorld(DataWorld):
    """datapath's world without its tracemalloc probe (nothing extra in the Agent)."""

    def spawn(self, node: str, argv: list[str], name: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        p = World.spawn(self, node, argv, name, env=env or child_env({}))
        self.roles[name.split("-")[0]] = p
        return p


class Traffic:
    """curl (TCP through the TUN) restarted whenever it ends, plus a paced UDP flood."""

    def __init__(self, world: DataWorld, udp_pps: float) -> None:
        self.world = world
        self.udp_pps = udp_pps
        self.curl: subprocess.Popen[bytes] | None = None
        self.flood: subprocess.Popen[bytes] | None = None
        self.downloads = 0
        self.bytes = 0
        self.udp_sent = 0
        self.udp_echoed = 0

    def _curl(self) -> None:
        fmt = '{"size":%{size_download}}'
        self.curl = self.world.lab.spawn("agent", ["curl", "-sS", "--max-time", "60", "-o", "/dev/null",
                                                   "-w", fmt, f"http://{VIP4}/big"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def _flood(self) -> None:
        self.flood = self.world.lab.spawn("agent", [PY, "-c", FLOOD, VIP4, "30", str(self.udp_pps)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def _reap(self, p: subprocess.Popen[bytes] | None) -> dict[str, Any]:
        if p is None:
            return {}
        out = (p.stdout.read() if p.stdout else b"") or b"{}"
        try:
            return dict(json.loads(out.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return {}

    def keep_going(self) -> None:
        if self.curl is None or self.curl.poll() is not None:
            info = self._reap(self.curl)
            if self.curl is not None:
                self.downloads += 1
                self.bytes += int(info.get("size", 0))
            self._curl()
        if self.udp_pps > 0 and (self.flood is None or self.flood.poll() is not None):
            info = self._reap(self.flood)
            self.udp_sent += int(info.get("sent", 0))
            self.udp_echoed += int(info.get("echoed", 0))
            self._flood()

    def stop(self) -> None:
        for p in (self.curl, self.flood):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)


def summarize(samples: list[dict[str, float]], warmup: float, limit_mb: float, flat_mb: float) -> dict[str, Any]:
    steady = [s for s in samples if s["t"] >= warmup] or samples
    mb = [s["rss_kb"] / 1024 for s in steady]
    q = max(len(mb) // 4, 1)
    second_quarter = statistics.mean(mb[q:2 * q] or mb)
    last_quarter = statistics.mean(mb[-q:])
    peak = max(s["hwm_kb"] for s in steady) / 1024
    return {
        "samples": len(samples), "steady_samples": len(steady),
        "start_mb": round(mb[0], 1), "end_mb": round(mb[-1], 1),
        "min_mb": round(min(mb), 1), "max_mb": round(max(mb), 1), "peak_hwm_mb": round(peak, 1),
        "second_quarter_mean_mb": round(second_quarter, 2), "last_quarter_mean_mb": round(last_quarter, 2),
        "growth_mb": round(last_quarter - second_quarter, 2),
        "within_limit": max(mb) <= limit_mb, "flat": last_quarter - second_quarter < flat_mb,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds left out of the verdict")
    ap.add_argument("--path", choices=("direct", "relay"), default="direct")
    ap.add_argument("--udp-pps", type=float, default=2000.0, help="UDP datagrams/s beside the TCP download")
    ap.add_argument("--limit-mb", type=float, default=50.0)
    ap.add_argument("--flat-mb", type=float, default=2.0)
    ap.add_argument("--json", help="write the series and the summary here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ztna-soak-"))
    (work / "www").mkdir()
    with open(work / "www" / "big", "wb") as fh:
        fh.truncate(1 << 30)  # sparse: the backend reads zeros from the page cache
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), "rev-parse",
                                  "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "args": vars(args), "samples": [],
    }
    cfg = LabConfig(prefix=unique_prefix(), nat_a="cone", nat_b="cone", ip="4")
    with Lab(cfg) as lab:
        probe = work / "probe"
        probe.mkdir()
        world = SoakWorld(lab, work / "world", probe)
        try:
            world.start_infra(work / "www")
            if args.path == "relay":
                lab.block_udp("conn", 4434, direction="both")
            world.start_agent("datagram")
            world.wait(args.path, timeout=40)
            agent = world.roles["agent"].pid
            traffic = Traffic(world, args.udp_pps)
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            next_sample = t0
            print(f"{'t (s)':>7} {'RSS MB':>7} {'peak MB':>8} {'downloads':>9} {'path':>6}", flush=True)
            while time.monotonic() < end:
                traffic.keep_going()
                now = time.monotonic()
                if now >= next_sample:
                    snap = world.status() or {}
                    path = ((snap.get("services") or [{}])[0]).get("path")
                    s = {"t": round(now - t0, 1), "rss_kb": rss_kb(agent), "hwm_kb": hwm_kb(agent),
                         "downloads": traffic.downloads, "path": path}
                    result["samples"].append(s)
                    print(f"{s['t']:7.1f} {s['rss_kb'] / 1024:7.1f} {s['hwm_kb'] / 1024:8.1f} "
                          f"{traffic.downloads:9d} {path!s:>6}", flush=True)
                    next_sample += args.interval
                time.sleep(0.2)
            traffic.stop()
            snap = world.status() or {}
            svc = (snap.get("services") or [{}])[0]
            result["traffic"] = {"downloads": traffic.downloads, "tcp_bytes": traffic.bytes,
                                 "udp_sent": traffic.udp_sent, "udp_echoed": traffic.udp_echoed,
                                 "agent_tx_bytes": svc.get("tx_bytes"), "agent_rx_bytes": svc.get("rx_bytes"),
                                 "tun_native": (snap.get("tun") or {}).get("native")}
        finally:
            world.close()
    result["summary"] = summarize(result["samples"], args.warmup, args.limit_mb, args.flat_mb)
    print(json.dumps({"summary": result["summary"], "traffic": result.get("traffic")}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
