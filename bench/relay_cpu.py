#!/usr/bin/env python3
"""CPU per DATAGRAM of the Intermediate's Python relay, in process: no sockets, no QUIC.

An Intermediate (not started) with one Agent and one Connector of one service, whose
connections are plain objects that count what is sent to them; each round relays N
DATAGRAMs through `Intermediate.on_datagram`, half 0x2F from the Agent (to 0x30 for the
Connector) and half 0x31 from the Connector (to the bare packet for the Agent). What it
measures is the Python decision and framing alone, which `bench/hotpath_alloc.py --relay
python` sees mixed with the QUIC work and the load generator. Prints the best round.

    python bench/relay_cpu.py --packets 200000 --rounds 5
    PYTHONPATH=/path/to/other/checkout/src python bench/relay_cpu.py   (another tree's code)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

PACKET = bytes.fromhex("4500001c00004000401100007f0000017f00000200070007000800") + bytes(1172)


class _Conn:
    """What the relay touches of a connection; counts the DATAGRAMs sent to it."""

    def __init__(self, peer_id: int, label: str) -> None:
        self.user, self.label, self.handle = peer_id, label, peer_id
        self.closed, self.created_at, self.endpoint = False, 0.0, None
        self.sent = 0

    def max_datagram_payload(self) -> int:
        return 1400

    def send_datagram(self, data: bytes) -> bool:
        self.sent += 1
        return True

    def send_control(self, frame: bytes) -> None:
        pass


async def measure(packets: int, rounds: int) -> dict[str, float]:
    from ztna.intermediate.registry import AllowAll
    from ztna.intermediate.server import Intermediate, IntermediateOptions
    from ztna.quic.config import TlsFiles
    from ztna.wire import Register, Role, encode_from_connector, encode_service_datagram

    unused = Path("unused")
    srv = Intermediate(IntermediateOptions(tls=TlsFiles(cert=unused, key=unused, ca=unused)))
    agent, connector = _Conn(1, "agent#1"), _Conn(2, "connector#2")
    for conn in (agent, connector):
        srv.registry.add_peer(conn.user, AllowAll(), conn.label)
        srv.conns[conn.user] = conn  # type: ignore[assignment]
    srv.registry.register(2, Register(role=Role.CONNECTOR, service_id="web"))
    srv.registry.register(1, Register(role=Role.AGENT, service_id="web"))
    srv.registry.take_changed()   # no endpoints: no native routes to install
    up, down = encode_service_datagram("web", PACKET), encode_from_connector(1, PACKET)
    relay = srv.on_datagram
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(packets // 2):
            relay(agent, up)  # type: ignore[arg-type]
            relay(connector, down)  # type: ignore[arg-type]
        best = min(best, (time.perf_counter() - start) / (packets // 2 * 2))
    if agent.sent + connector.sent != rounds * (packets // 2 * 2):
        raise SystemExit(f"relayed {agent.sent + connector.sent} of {rounds * packets} DATAGRAMs")
    return {"us_per_datagram": round(best * 1e6, 3), "packets": packets, "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=200_000, help="DATAGRAMs per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (the best one is reported)")
    args = ap.parse_args()
    res = asyncio.run(measure(args.packets, args.rounds))
    print(json.dumps(res))
    print(f"{res['us_per_datagram']:.2f} µs per relayed DATAGRAM (best of {args.rounds} × {args.packets})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
