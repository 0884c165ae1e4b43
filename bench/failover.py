"""Health-checked failover: how long until the Intermediate stops (and resumes) giving a
Connector new flows, and what choosing a Connector per relayed datagram costs.

1. Real processes on loopback: `ztna intermediate` (metrics on) and two `ztna connector`s
   serving one service, each with its own TCP backend (default check: TCP connect every
   2 s, down after 3 failures, up after 2 successes). The backend of one is closed; we time
   until the Intermediate's `ztna_unhealthy_connectors` says 1, then reopen it and time
   until it says 0. Repeated `--runs` times.
2. In process: `Registry.connector_for` for a two-Connector pool, per packet, without and
   with flow pinning (`now=`), over `--flows` distinct UDP flows.

    python bench/failover.py --runs 3 --json bench/results/failover.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ztna.certs import init_pki
from ztna.intermediate.registry import AllowAll, Registry
from ztna.netstack.packets import build_udp_packet, ip_to_bytes
from ztna.wire import Register, Role

PY = sys.executable


def _free(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    return s


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _until(pred, timeout: float = 60.0) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.02)
    raise TimeoutError


def failover_times(runs: int) -> dict[str, list[float]]:
    tmp = Path(tempfile.mkdtemp(prefix="ztna-failover-"))
    pki = tmp / "pki"
    init_pki(pki, ["web"])
    iport, mport = _free(socket.SOCK_DGRAM), _free(socket.SOCK_STREAM)
    ports = [_free(socket.SOCK_STREAM), _free(socket.SOCK_STREAM)]
    backends = [_listen(p) for p in ports]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([PY, "-m", "ztna", "intermediate", "--listen", f"127.0.0.1:{iport}", "--pki", str(pki),
                               "--metrics", f"127.0.0.1:{mport}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)]
    for i, port in enumerate(ports):
        procs.append(subprocess.Popen(
            [PY, "-m", "ztna", "connector", "--intermediate", f"127.0.0.1:{iport}", "--server-name", "localhost",
             "--pki", str(pki), "--p2p-port", "off", "--metrics", "off", "--name", f"c{i}",
             "--service", f"web=10.100.0.2;tcp:80=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    down: list[float] = []
    up: list[float] = []
    try:
        _until(lambda: (_metric(mport, "ztna_registrations_total") or 0) >= 2)
        for _ in range(runs):
            backends[0].close()
            down.append(_until(lambda: _metric(mport, "ztna_unhealthy_connectors") == 1))
            backends[0] = _listen(ports[0])
            up.append(_until(lambda: _metric(mport, "ztna_unhealthy_connectors") == 0))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        for b in backends:
            b.close()
    return {"unhealthy_after_s": down, "healthy_again_after_s": up}


def pick_cost(flows: int, packets: int) -> dict[str, float]:
    r = Registry()
    r.add_peer(1, AllowAll(), "agent")
    for c in (10, 11):
        r.add_peer(c, AllowAll(), f"c{c}")
        r.register(c, Register(role=Role.CONNECTOR, service_id="web"))
    src, dst = ip_to_bytes("100.64.0.1"), ip_to_bytes("10.100.0.2")
    pkts = [build_udp_packet(src, dst, 1024 + i % flows, 53, b"x" * 64) for i in range(flows)]
    out = {}
    for label, now in (("unpinned", None), ("pinned", 1.0)):
        start = time.perf_counter()
        for i in range(packets):
            r.connector_for("web", pkts[i % flows], now=now)
        out[f"{label}_us_per_packet"] = (time.perf_counter() - start) / packets * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--json")
    args = ap.parse_args()
    result: dict[str, object] = {"pick": pick_cost(args.flows, args.packets)}
    times = failover_times(args.runs)
    result["failover"] = {**times, **{f"{k}_median": statistics.median(v) for k, v in times.items()}}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
