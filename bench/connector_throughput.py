"""Connector TCP throughput through the relay, one run: TCP-in-DATAGRAM (Connector flow
control on / off) and TCP-on-QUIC-streams, download and upload, interleaved.

Run as root:  python bench/connector_throughput.py [--mb 50] [--rounds 2] [--loss 0]
                  [--json bench/results/connector_throughput.json]

Two namespace worlds from `ztna.worlds.bridge` run side by side (Intermediate,
Connector, http.server + sha256 sink backends, the test TUN bridge as Agent, the kernel's
TCP): one Connector with flow control (the default: the endpoint's window follows the
backend's free space, segments leave within the DATAGRAM budget) and one started with the
hidden `--no-flow-control` (read everything, ignore budgets). Every transfer is sha256-
checked. The variants run interleaved, round-robin, each round in a rotated order, so the
noise of this shared box spreads over all of them; the table shows the median MB/s and
every sample. `--loss N` drops N % of the UDP datagrams to and from the Intermediate in
both worlds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ztna.worlds.bridge import Ns, download, start_world, stop_world, stream, upload

# (name, world, carriage, direction)
VARIANTS = [
    ("datagram down, flow control", "fc", "datagram", "down"),
    ("datagram up, flow control", "fc", "datagram", "up"),
    ("datagram down, no flow control", "nofc", "datagram", "down"),
    ("datagram up, no flow control", "nofc", "datagram", "up"),
    ("stream down", "fc", "stream", "down"),
    ("stream up", "fc", "stream", "up"),
]


def one(ns: Ns, carriage: str, direction: str, size: int) -> float:
    if carriage == "datagram":
        return download(ns, size) if direction == "down" else upload(ns, size)
    return stream(ns, "get" if direction == "down" else "upload", size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loss", type=int, default=0, help="percent, each way, relay UDP port")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", default="", help="run the variants whose name contains this")
    args = ap.parse_args()
    variants = [v for v in VARIANTS if args.only in v[0]]
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, TUN, nftables)")
    size = args.mb << 20
    tmp = Path(tempfile.mkdtemp(prefix="ztna-conn-bench-"))
    worlds: dict[str, Ns] = {}
    samples: dict[str, list[float]] = {name: [] for name, *_ in variants}
    load = [os.getloadavg()[0]]
    try:
        for key, extra in (("fc", ()), ("nofc", ("--no-flow-control",))):
            if not any(v[1] == key for v in variants):
                continue
            (tmp / key).mkdir()
            worlds[key] = start_world(tmp / key, f"ztb{key}{os.getpid()}", extra)
            worlds[key].loss(args.loss)
        for r in range(args.rounds):
            shift = r % len(variants)
            for name, world, carriage, direction in variants[shift:] + variants[:shift]:
                dt = one(worlds[world], carriage, direction, size)
                samples[name].append(dt)
                print(f"round {r + 1}: {name}: {size / dt / 1e6:.2f} MB/s ({dt:.1f} s)",
                      file=sys.stderr, flush=True)
        load.append(os.getloadavg()[0])
    finally:
        for ns in worlds.values():
            stop_world(ns)
    rows: list[dict[str, Any]] = []
    for name, world, carriage, direction in variants:
        rates = [size / dt / 1e6 for dt in samples[name]]
        rows.append({"variant": name, "carriage": carriage, "direction": direction,
                     "flow_control": world == "fc", "median_mb_s": statistics.median(rates),
                     "samples_mb_s": rates, "seconds": samples[name]})
    print(f"\n{args.mb} MB per transfer, relay path, loss {args.loss} % each way, "
          f"{args.rounds} round(s) interleaved; load average {load[0]:.1f} → {load[-1]:.1f} "
          f"on {os.cpu_count()} CPUs; sha256-exact\n")
    print("| variant | carriage | direction | Connector flow control | MB/s (median) | samples MB/s |")
    print("| --- | --- | --- | --- | ---: | --- |")
    for row in rows:
        fc = "—" if row["carriage"] == "stream" else ("on" if row["flow_control"] else "off")
        print(f"| {row['variant']} | {row['carriage']} | {row['direction']} | {fc} | "
              f"{row['median_mb_s']:.2f} | {', '.join(f'{x:.2f}' for x in row['samples_mb_s'])} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mb": args.mb,
            "rounds": args.rounds, "loss_percent": args.loss, "load_average": load,
            "cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
