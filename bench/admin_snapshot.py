"""How long one admin answer holds the Intermediate's event loop: a real Intermediate with
N real QUIC connections (registered Agents of one service and its Connector, in this
process), timing `admin_snapshot()` (the copy taken on the loop) and turning it into the
dashboard's JSON event (what every SSE client costs per second).

    python bench/admin_snapshot.py --agents 200 --repeat 50 --json bench/results/admin_snapshot.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from ztna.certs import init_pki
from ztna.intermediate.admin import models
from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.wire import Register, Role, encode_control


async def run(agents: int, repeat: int, profile: bool = False) -> dict[str, float]:
    pki = Path(tempfile.mkdtemp()) / "pki"
    init_pki(pki, ["web"])
    inter = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(pki, "intermediate"), listen=[("127.0.0.1", 0)],
                                             metrics=None, retry=False, handshakes_per_source_per_second=1e6))
    await inter.start()
    ep = QuicEndpoint(bind_udp("127.0.0.1", 0))
    conns = []
    for i in range(agents + 1):
        role = Role.CONNECTOR if i == 0 else Role.AGENT
        tls = TlsFiles.from_dir(pki, "connector" if i == 0 else "agent")
        config = make_configuration(is_client=True, tls=tls, server_name="localhost")
        conn = ep.connect(("127.0.0.1", inter.ports[0]), config, ConnectionHandler())
        conn.send_control(encode_control(Register(role=role, service_id="web")))
        conns.append(conn)
    await asyncio.gather(*(c.wait_handshake() for c in conns))
    while sum(len(v) for v in inter.registry.agents.values()) < agents:
        await asyncio.sleep(0.05)
    snap_ms, json_ms = [], []
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(repeat):
            inter.admin_snapshot()
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(12)
    for _ in range(repeat):
        t0 = time.perf_counter()
        snap = inter.admin_snapshot()
        t1 = time.perf_counter()
        models.dashboard(snap).model_dump_json()
        t2 = time.perf_counter()
        snap_ms.append((t1 - t0) * 1000)
        json_ms.append((t2 - t1) * 1000)
    connections = len(inter.conns)
    for c in conns:
        c.close()
    await inter.stop()
    return {"connections": connections, "snapshot_ms_p50": statistics.median(snap_ms),
            "snapshot_ms_max": max(snap_ms), "event_json_ms_p50": statistics.median(json_ms),
            "event_json_ms_max": max(json_ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", action="store_true", help="cProfile of admin_snapshot (top 12)")
    args = ap.parse_args()
    result = asyncio.run(run(args.agents, args.repeat, args.profile))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
