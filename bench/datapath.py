#!/usr/bin/env python3
"""Data-path cost of the real programs: Mbit/s, packets/s, CPU µs per packet per process.

    sudo .venv/bin/python bench/datapath.py --seconds 10 --json bench/results/datapath.json
    ... --profile           # also py-spy (raw, --idle) of each process during a TCP window
    ... --trace             # also tracemalloc: net live blocks per forwarded packet per process
    ... --rss-seconds 180   # Agent RSS sampled every 5 s under sustained TCP traffic

One world: the programs as installed, i.e. the native QUIC core (`ztna._native`:
quinn-proto, quinn-udp, rustls). The aioquic-era worlds (`--clients aioquic,aioquic-pacer,qh3`
and the aioquic pacer patch in bench/_probe) are gone with aioquic; to measure "before", run
this script from a checkout of commit 4dde96d (the last aioquic version) with its own venv.

One `ztna.lab` (nat cone/cone, IPv4), the real `ztna intermediate` (relay node),
`ztna connector` (conn node) and `ztna agent --mode tun --tcp-transport datagram` (agent
node): every TCP segment rides a DATAGRAM through the Agent's TUN loop, the adapter's
socket loop, the Intermediate's relay (relay path) and the Connector's userspace TCP.
Backends on the app node: `http.server` serving a sparse 1 GiB file (curl downloads it for
`--seconds`, `-o /dev/null`) and a UDP echo server. Windows per path (direct first, then
relay with the Connector's P2P port blocked and a fresh Agent):

* tcp-down: curl for `--seconds`; Mbit/s from curl's own byte count.
* udp-flood: `--flood-pps` 64-byte datagrams per second (0 = as fast as Python sends) to
  the echo backend through the tunnel; sent / echoed packets per second.

`--tcp-transport stream` runs the Agent with TCP on QUIC streams instead (nftables redirect,
each connection spliced natively to its stream; `--python-splice` sets ZTNA_PYTHON_SPLICE=1
for every program, the Python copy loops, to compare the two in one run). No TCP segment
crosses the TUN then, and veth GRO merges the uplink's packets, so "packets" are payload
packets: the bytes curl received / 1300 (one full QUIC packet's stream payload); `us_per_mb`
is CPU µs per MB of payload.

"Packets" = packets through the Agent's TUN device (rx+tx, from the kernel's counters):
every one of them crossed each process once, so µs/packet of a process = its CPU time
(utime+stime from /proc) over the window ÷ TUN packets. The lab processes share the box
with the load generators (curl, http.server, the NAT namespaces' softirqs) and with
anything else running on it: compare runs taken side by side, not across days.
The native core runs on the Python thread of each program (no threads of its own); /proc's
utime+stime counts every thread of the process anyway, Rust and Python alike.

`--profile` (py-spy) sees Python frames only unless py-spy is given `--native`
(`--pyspy-native`); `--trace` (tracemalloc) sees the Python heap only: buffers the Rust
core allocates are invisible to it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ztna.lab import Lab, LabConfig
from ztna.lab.config import unique_prefix
from ztna.procs import child_env
from ztna.procs import stop as stop_process
from ztna.worlds.lab_tun import PY, VIP4, World

ROOT = Path(__file__).resolve().parent.parent

PROBE = ROOT / "bench" / "_probe"
PYSPY = str(Path(sys.executable).parent / "py-spy")
TICK = os.sysconf("SC_CLK_TCK")

UDP_ECHO = (
    "import socket\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',7))\n"
    "while True:\n"
    " d,a=s.recvfrom(65535); s.sendto(d,a)\n"
)

FLOOD = (
    "import socket,sys,time,json\n"
    "host,secs,pps=sys.argv[1],float(sys.argv[2]),float(sys.argv[3])\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.setblocking(False); s.connect((host,7))\n"
    "payload=b'x'*36; sent=recv=0; t0=time.perf_counter(); end=t0+secs\n"
    "while True:\n"
    " now=time.perf_counter()\n"
    " if now>=end: break\n"
    " if pps<=0 or sent<(now-t0)*pps:\n"
    "  try: s.send(payload); sent+=1\n"
    "  except BlockingIOError: pass\n"
    " while True:\n"
    "  try: s.recv(2048); recv+=1\n"
    "  except BlockingIOError: break\n"
    " if pps>0 and sent>=(now-t0)*pps: time.sleep(0.0002)\n"
    "t1=time.perf_counter(); time.sleep(0.5)\n"
    "while True:\n"
    " try: s.recv(2048); recv+=1\n"
    " except BlockingIOError: break\n"
    "print(json.dumps({'sent':sent,'echoed':recv,'seconds':t1-t0}))\n"
)


class DataWorld(World):
    """ztna.worlds.lab_tun's World with a UDP service and the tracemalloc probe."""

    def __init__(self, lab: Any, workdir: Path, probe_dir: Path) -> None:
        super().__init__(lab, workdir)
        self.probe_dir = probe_dir
        self.roles: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, node: str, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        env = child_env({"PYTHONPATH": str(PROBE), "ZTNA_PROBE_DIR": str(self.probe_dir)})
        p = super().spawn(node, argv, name, env=env)
        self.roles[name.split("-")[0]] = p
        return p

    def start_infra(self, www: Path) -> None:  # type: ignore[override]
        from ztna.certs import init_pki

        if not (self.pki / "ca.pem").exists():
            init_pki(self.pki, ["web"], hosts=["ztna-intermediate"])
        self.spawn("app", [PY, "-m", "http.server", "--bind", self.app, "8080", "--directory",
                           str(www)], "http")
        self.spawn("app", [PY, "-c", UDP_ECHO], "udpecho")
        self.spawn("relay", [PY, "-m", "ztna", "intermediate", "--pki", str(self.pki),
                             "--metrics", "off"], "intermediate")
        time.sleep(0.5)
        self.spawn("conn", [PY, "-m", "ztna", "connector", "--intermediate", self.inter,
                            "--server-name", "ztna-intermediate", "--pki", str(self.pki),
                            "--metrics", "off", "--service",
                            f"web={VIP4};tcp:80={self.app}:8080;udp:7={self.app}:7"], "connector")
        time.sleep(0.5)


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


COUNT_WAN = False   # stream transport: count the uplink's packets, not the TUN's
STREAM_PACKET = 1300  # stream payload bytes of one full QUIC packet (1350-byte UDP payload)


def tun_packets(world: DataWorld) -> int:
    if COUNT_WAN:
        r = world.lab.run("agent", ["ip", "-s", "-j", "link", "show"])
        return sum(int(i["stats64"]["rx"]["packets"]) + int(i["stats64"]["tx"]["packets"])
                   for i in json.loads(r.stdout) if i["ifname"] not in ("lo", "ztna0"))
    r = world.lab.run("agent", ["ip", "-s", "-j", "link", "show", "ztna0"])
    st = json.loads(r.stdout)[0]["stats64"]
    return int(st["rx"]["packets"]) + int(st["tx"]["packets"])


def procs(world: DataWorld) -> dict[str, int]:
    return {k: world.roles[k].pid for k in ("agent", "intermediate", "connector")}


class Window:
    """CPU and TUN packet deltas of the three programs over one measurement window."""

    def __init__(self, world: DataWorld) -> None:
        self.world = world
        self.pids = procs(world)

    def __enter__(self) -> Window:
        self.t0 = time.perf_counter()
        self.p0 = tun_packets(self.world)
        self.c0 = {k: cpu_ticks(p) for k, p in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.dt = time.perf_counter() - self.t0
        self.packets = tun_packets(self.world) - self.p0
        self.cpu = {k: (cpu_ticks(p) - self.c0[k]) / TICK for k, p in self.pids.items()}

    def result(self) -> dict[str, Any]:
        pk = max(self.packets, 1)
        return {"seconds": round(self.dt, 2), "tun_packets": self.packets,
                "tun_pps": round(self.packets / self.dt),
                "cpu_pct": {k: round(100 * v / self.dt, 1) for k, v in self.cpu.items()},
                "us_per_packet": {k: round(1e6 * v / pk, 1) for k, v in self.cpu.items()}}


def curl_window(world: DataWorld, seconds: float) -> dict[str, Any]:
    fmt = '{"time_total":%{time_total},"size":%{size_download}}'
    with Window(world) as w:
        r = world.lab.run("agent", ["curl", "-sS", "--max-time", str(seconds), "-o", "/dev/null",
                                    "-w", fmt, f"http://{VIP4}/big"], check=False,
                          timeout=seconds + 30)
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = {"size": 0, "time_total": seconds}
    res = w.result()
    res["mbit_s"] = round(int(info["size"]) * 8 / float(info["time_total"]) / 1e6, 2)
    res["bytes"] = int(info["size"])
    if COUNT_WAN:
        # veth GRO/GSO merges the uplink's packets, so per packet is per payload-sized packet
        # here: the bytes curl got / STREAM_PACKET (a full QUIC packet's stream payload).
        pk = max(1, res["bytes"] // STREAM_PACKET)
        res["payload_packets"] = pk
        res["us_per_packet"] = {k: round(1e6 * v / pk, 2) for k, v in w.cpu.items()}
        res["us_per_mb"] = {k: round(1e12 * v / max(res["bytes"], 1), 1) for k, v in w.cpu.items()}
    return res


def flood_window(world: DataWorld, seconds: float, pps: float) -> dict[str, Any]:
    with Window(world) as w:
        r = world.lab.run("agent", [PY, "-c", FLOOD, VIP4, str(seconds), str(pps)], check=False,
                          timeout=seconds + 30)
    res = w.result()
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
        res.update(sent_pps=round(info["sent"] / info["seconds"]),
                   echoed_pps=round(info["echoed"] / info["seconds"]),
                   echoed_pct=round(100 * info["echoed"] / max(info["sent"], 1), 1))
    except (ValueError, IndexError, KeyError):
        res["error"] = r.stderr[-300:]
    return res


def summarize_raw(path: Path, top: int = 15) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks of the main thread -> top functions by own and inclusive samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        if any("concurrent/futures/thread.py" in f for f in frames):
            continue  # asyncio's executor threads, parked on their queue: not the event loop
        total += count
        leaf = frames[-1]
        own[leaf] += count
        if ("select (selectors.py" in leaf or "_run_once" in leaf and "select" in leaf
                or leaf.startswith("epoll_wait")):  # epoll_wait: the leaf with --pyspy-native
            idle += count
        for f in set(frames):
            incl[f] += count
    pct = lambda c: round(100 * c / max(total, 1), 1)  # noqa: E731
    return {"samples": total, "idle_pct": pct(idle),
            "own": [(f, pct(c)) for f, c in own.most_common(top)],
            "inclusive": [(f, pct(c)) for f, c in incl.most_common(top + 10)]}


def profile_window(world: DataWorld, seconds: float, outdir: Path, tag: str,
                   args_native: bool = False) -> dict[str, Any]:
    spies = {}
    for role, pid in procs(world).items():
        out = outdir / f"pyspy-{tag}-{role}.txt"
        native = ["--native"] if args_native else []
        spies[role] = (out, subprocess.Popen([PYSPY, "record", "--idle", *native, "-f", "raw",
                                              "-r", "200", "-d", str(int(seconds)), "-p", str(pid),
                                              "-o", str(out)], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL))
    time.sleep(0.5)
    res = curl_window(world, seconds)
    out: dict[str, Any] = {"window": res}
    for role, (path, p) in spies.items():
        stop_process(p, grace=seconds + 20, sig=None)  # py-spy ends by itself after -d seconds
        out[role] = summarize_raw(path) if path.exists() else {"error": "no py-spy output"}
    return out


def trace_window(world: DataWorld, seconds: float) -> dict[str, Any]:
    pids = procs(world)
    for f in world.probe_dir.glob("*.json"):
        f.unlink()
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)
    time.sleep(1.0)
    res = curl_window(world, seconds)
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR2)
    time.sleep(2.0)
    out: dict[str, Any] = {"window": res}
    for role, pid in pids.items():
        f = world.probe_dir / f"{pid}.json"
        if not f.exists():
            out[role] = {"error": "no probe output"}
            continue
        d = json.loads(f.read_text())
        pk = max(res["tun_packets"], 1)
        out[role] = {"net_blocks_per_packet": round(d["count_diff"] / pk, 4),
                     "net_bytes_per_packet": round(d["size_diff"] / pk, 2),
                     "allocated_blocks_delta_per_packet": round(d["allocated_blocks_delta"] / pk, 4),
                     "top": d["top"][:5]}
    return out


def rss_window(world: DataWorld, seconds: float) -> dict[str, Any]:
    pid = procs(world)["agent"]
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    fmt = '{"time_total":%{time_total},"size":%{size_download}}'
    curl = world.lab.spawn("agent", ["curl", "-sS", "--max-time", str(seconds), "-o", "/dev/null",
                                     "-w", fmt, "--limit-rate", "0", f"http://{VIP4}/big"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    while curl.poll() is None:
        samples.append((round(time.perf_counter() - t0, 1), rss_kb(pid)))
        time.sleep(5)
    info = json.loads((curl.stdout.read() or b"{}").decode() or "{}")  # type: ignore[union-attr]
    kb = [s[1] for s in samples]
    half = len(kb) // 2
    return {"samples_kb": samples, "start_kb": kb[0] if kb else None, "max_kb": max(kb or [0]),
            "end_kb": kb[-1] if kb else None,
            "second_half_growth_kb": (kb[-1] - kb[half]) if kb else None,
            "mbit_s": round(int(info.get("size", 0)) * 8 / max(float(info.get("time_total", 1)), 1e-3) / 1e6, 2)}


def run_world(lab: Lab, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    client = "native"  # the JSON key of the aioquic-era worlds, kept for old readers
    probe = work / f"probe-{client}"
    probe.mkdir(exist_ok=True)
    world = DataWorld(lab, work / client, probe)
    result: dict[str, Any] = {"client": client, "paths": {}}
    try:
        world.start_infra(work / "www")
        for path in args.paths:
            if path == "relay":
                lab.block_udp("conn", 4434, direction="both")
            world.start_agent(args.tcp_transport)
            world.roles["agent"] = world.agent  # type: ignore[assignment]
            world.wait(path, timeout=40)
            time.sleep(1.0)
            res: dict[str, Any] = {"agent_mtu": tun_mtu(world)}
            for _i in range(args.repeat):
                res.setdefault("tcp_down", []).append(curl_window(world, args.seconds))
                print(f"[{client} {path}] tcp {res['tcp_down'][-1]}", flush=True)
            if "udp" in args.modes:
                res["udp_flood"] = flood_window(world, args.seconds, args.flood_pps)
                print(f"[{client} {path}] udp {res['udp_flood']}", flush=True)
            if args.profile:
                res["profile"] = profile_window(world, args.seconds, work, f"{client}-{path}",
                                                args.pyspy_native)
            if args.trace:
                res["trace"] = trace_window(world, args.seconds)
                print(f"[{client} {path}] trace {json.dumps(res['trace'])[:600]}", flush=True)
            if args.rss_seconds and path == args.paths[-1]:
                res["agent_rss"] = rss_window(world, args.rss_seconds)
            res["final_path"] = ((world.status() or {}).get("services") or [{}])[0].get("path")
            result["paths"][path] = res
            world.stop_agent()
        if "relay" in args.paths:
            lab.unblock_udp("conn", 4434)
    finally:
        world.close()
    return result


def tun_mtu(world: DataWorld) -> int | None:
    r = world.lab.run("agent", ["ip", "-j", "link", "show", "ztna0"], check=False)
    try:
        return int(json.loads(r.stdout)[0]["mtu"])
    except (ValueError, IndexError, KeyError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=1, help="TCP windows per path")
    ap.add_argument("--paths", default="direct,relay")
    ap.add_argument("--modes", default="tcp,udp")
    ap.add_argument("--flood-pps", type=float, default=10000.0,
                    help="UDP datagrams/s offered (0 = as fast as Python sends: mostly measures drops)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--pyspy-native", action="store_true",
                    help="with --profile: py-spy --native (frames inside the Rust core)")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--rss-seconds", type=float, default=0.0)
    ap.add_argument("--tcp-transport", choices=("datagram", "stream"), default="datagram")
    ap.add_argument("--python-splice", action="store_true",
                    help="with --tcp-transport stream: TCP bytes through Python (ZTNA_PYTHON_SPLICE=1)")
    ap.add_argument("--json")
    args = ap.parse_args()
    global COUNT_WAN
    COUNT_WAN = args.tcp_transport == "stream"
    if args.python_splice:
        os.environ["ZTNA_PYTHON_SPLICE"] = "1"
    args.paths = args.paths.split(",")
    args.modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="ztna-datapath-"))
    (work / "www").mkdir()
    with open(work / "www" / "big", "wb") as fh:
        fh.truncate(1 << 30)  # sparse: the backend reads zeros from the page cache
    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short",
                                                     "HEAD"], capture_output=True,
                                                    text=True).stdout.strip(),
                           "seconds": args.seconds, "tcp_transport": args.tcp_transport,
                           "python_splice": args.python_splice, "worlds": []}
    cfg = LabConfig(prefix=unique_prefix(), nat_a="cone", nat_b="cone", ip="4")
    with Lab(cfg) as lab:
        out["worlds"].append(run_world(lab, work, args))
    print(json.dumps(out, indent=1))
    print(f"workdir (logs, py-spy raw): {work}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
