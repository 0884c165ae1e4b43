#!/usr/bin/env python3
"""Reconnect time, 0-RTT vs full handshake, in the lab with link delay.

Real processes: `ztna intermediate` on `relay`, `ztna connector` on `conn` with a UDP echo
service whose backend runs on `app`. A probe in the Agent's namespace reconnects N times
in each mode and measures **from the start of the reconnect to the first echoed byte**
(connect → Hello + Register → ACK → one 0x2F UDP packet → its echo back), exactly what an
Agent does after a network change or an Intermediate restart:

* `full-cold`   no session ticket, no address token: Retry + full mTLS handshake
* `full-token`  address token (no Retry), no ticket: full mTLS handshake
* `0-rtt`       ticket + token: Hello and Register ride in 0-RTT

Tickets and address tokens live in the native client configuration, in memory: `0-rtt` uses a
resuming configuration, the two `full-*` modes one without resumption, whose tokens
`full-cold` forgets before each try.

Run as root:  python bench/reconnect.py --runs 20 --delay 10 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = r'''
import asyncio, json, sys, time
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.netstack.packets import build_udp_packet, ip_to_bytes, parse_ip, parse_udp
from ztna.wire import *

pki, server, runs, state = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
host, port = server.rsplit(":", 1)
SRC, DST = ip_to_bytes("100.64.0.1"), ip_to_bytes("10.100.0.7")

class Probe(ConnectionHandler):
    def __init__(self):
        self.acked = asyncio.Event(); self.echo = asyncio.Event()
    def on_message(self, conn, msg):
        if isinstance(msg, RegistrationAck): self.acked.set()
    def on_datagram(self, conn, data):
        if data[:1] in (b"\x45",):
            ip = parse_ip(data); u = parse_udp(data, ip)
            if bytes(u.payload) == b"ping": self.echo.set()

async def once(mode):
    ep = QuicEndpoint(bind_udp("0.0.0.0", 0))
    cfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "agent"), server_name="localhost")
    cfg.resumption = mode == "0-rtt"
    if mode == "full-cold":
        cfg.forget_sessions()
    h = Probe()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    conn = ep.connect((host, int(port)), cfg, h)
    conn.send_control(encode_control(Hello(instance=12345)))
    conn.send_control(encode_control(Register(role=Role.AGENT, service_id="echo")))
    # Like the Agent: the first tunnel packet goes right behind the registration (in 0-RTT
    # when resuming); the Intermediate holds it until the registration is processed.
    conn.send_datagram(encode_service_datagram("echo", build_udp_packet(SRC, DST, 40000, 7, b"ping")))
    await asyncio.wait_for(h.acked.wait(), 10)
    await asyncio.wait_for(h.echo.wait(), 10)
    elapsed = (loop.time() - t0) * 1000
    await asyncio.sleep(0.05)   # let the next ticket and token arrive
    kind = "0-RTT" if conn.early_data_accepted else ("resumed" if conn.resumed else "full")
    conn.close(); await asyncio.sleep(0.02); ep.shutdown_socket()
    return elapsed, kind

async def main():
    await once("0-rtt")        # warm-up: the first ticket + token of the resuming configuration
    out = {"full-cold": [], "full-token": [], "0-rtt": []}
    kinds = {k: [] for k in out}
    for _ in range(runs):
        for mode in out:      # interleaved, so load changes hit every mode alike
            ms, kind = await once(mode)
            out[mode].append(ms); kinds[mode].append(kind)
    print(json.dumps({"samples": out, "kinds": kinds}))

asyncio.run(main())
'''


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--delay", type=float, default=10.0, help="one-way delay per WAN link (ms)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--prefix", default="rc")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    from ztna.certs import init_pki
    from ztna.lab import Lab, LabConfig

    ztna = [sys.executable, "-m", "ztna"]
    work = Path(tempfile.mkdtemp(prefix="ztna-reconnect-"))
    init_pki(work / "pki", ["echo"], ["localhost", "203.0.113.10"], 1)
    (work / "probe.py").write_text(PROBE)
    lab = Lab(LabConfig(prefix=args.prefix, nat_a="cone", nat_b="cone", delay_ms=args.delay)).up()
    try:
        lab.spawn("relay", ztna + ["intermediate", "--listen", "[::]:4433", "--pki", str(work / "pki"),
                                   "--metrics", "off", "--state-dir", str(work / "istate")],
                  stdout=open(work / "int.log", "w"), stderr=subprocess.STDOUT)
        lab.spawn("app", [sys.executable, "-m", "ztna.demo.backends", "--host", "0.0.0.0", "--http-port", "0",
                          "--udp-port", "7", "--root", str(work), "--ready-file", str(work / "ready")],
                  stdout=open(work / "app.log", "w"), stderr=subprocess.STDOUT)
        lab.spawn("conn", ztna + ["connector", "--intermediate", "203.0.113.10:4433", "--pki", str(work / "pki"),
                                  "--service", "echo=10.100.0.7;udp:7=10.2.0.20:7", "--metrics", "off",
                                  "--p2p-port", "off"],
                  stdout=open(work / "conn.log", "w"), stderr=subprocess.STDOUT)
        time.sleep(2.0)
        probe = lab.run("agent", [sys.executable, str(work / "probe.py"), str(work / "pki"), "203.0.113.10:4433",
                                  str(args.runs), str(work / "tickets")], timeout=60 + args.runs * 10)
        data = json.loads(probe.stdout.strip().splitlines()[-1])
    finally:
        lab.down()
    samples = data["samples"]
    rows = {m: {"p50_ms": round(statistics.median(v), 1), "p95_ms": round(pct(v, 0.95), 1),
                "min_ms": round(min(v), 1), "runs": len(v),
                "handshakes": {k: data["kinds"][m].count(k) for k in set(data["kinds"][m])}}
            for m, v in samples.items()}
    ratio = rows["0-rtt"]["p50_ms"] / rows["full-cold"]["p50_ms"]
    ratio_tok = rows["0-rtt"]["p50_ms"] / rows["full-token"]["p50_ms"]
    print(f"Reconnect to first echoed byte, lab with {args.delay:g} ms one-way delay per WAN link "
          f"(agent↔relay RTT ≈ {2 * args.delay:g} ms), {args.runs} runs each\n")
    print("| mode | p50 ms | p95 ms | min ms | handshakes |")
    print("|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['p50_ms']} | {r['p95_ms']} | {r['min_ms']} | {r['handshakes']} |")
    print(f"\n0-RTT / full (cold, with Retry): {ratio:.2f}; 0-RTT / full (address token): {ratio_tok:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"delay_ms": args.delay, "rows": rows, "samples": samples,
                                               "ratio_vs_cold": ratio, "ratio_vs_token": ratio_tok}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
