#!/usr/bin/env python3
"""Allocations and CPU profile of the Intermediate's relay hot path under sustained traffic.

Two processes on loopback, so that only the Intermediate is measured:

* child (``--child``): a real ``ztna.intermediate.server.Intermediate`` on 127.0.0.1:0.
  It obeys one-line commands on stdin: ``trace-start`` / ``trace-stop`` (tracemalloc
  snapshot diff over the window), ``prof-start`` / ``prof-stop`` (cProfile, top 15 by
  own time), ``stats`` (its RelayStats), ``quit``. Each answer is one JSON line.
* parent (the load generator, also Python, on the same 2 cores): a Connector client
  (registers service ``bench``, echoes each ``0x30`` DATAGRAM back as
  ``0x31 01 [agent id][packet]``) and an Agent client (registers,
  then keeps sending ``0x2F [L][bench][packet]`` as fast as the congestion window
  allows, ``datagram_budget()``). It runs three windows of ``--seconds`` each: plain
  (packets/s with no instrumentation), tracemalloc (paced at ``--trace-rate`` packets/s:
  tracemalloc slows the relay ~20x and a flood would fill its bounded queues, which a
  snapshot diff would misread as retention), cProfile (flood).

"Forwarded packets" in a window = what the Intermediate relayed on both paths (both
directions: 0x2F->0x30 and 0x31->bare): the Python relay's ``relayed_datagrams`` plus the
native routes' ``relay_forwarded`` (endpoint counters). With ``--relay native`` (the default)
the Agent and the Connector share one socket, so after the registrations the native core
forwards everything and the profile shows what Python still does; ``--relay python`` puts
the Connector on a second socket, where no native route applies. What tracemalloc can say:
it traces *live* blocks, so the snapshot diff is the net number of blocks retained per
forwarded packet (growth / leaks, ideally ~0), not transient churn; the transient cost
shows in the profile as Python function calls per forwarded packet.

    python bench/hotpath_alloc.py --seconds 5 --json out.json     (no root needed)
    python bench/hotpath_alloc.py --seconds 5 --relay python
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any

from ztna import procs

SERVICE = "bench"
PACKET = bytes.fromhex("4500001c00004000401100007f0000017f00000200070007000800") + bytes(1172)


# ---------------------------------------------------------------------- child
async def child_main(pki: str) -> None:
    import logging

    from ztna.intermediate.server import Intermediate, IntermediateOptions
    from ztna.quic.config import TlsFiles

    logging.basicConfig(level=logging.WARNING, format="intermediate: %(message)s")
    # Two sockets: a Connector on the second is never on the Agent's endpoint, so no native
    # route applies and every DATAGRAM goes through the Python relay (--relay python).
    srv = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(pki, "intermediate"),
                                           listen=[("127.0.0.1", 0), ("127.0.0.1", 0)], metrics=None,
                                           retry=False, state_dir=pki))
    await srv.start()
    print(json.dumps({"ports": srv.ports}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    state: dict[str, Any] = {}
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        # Both paths: the Python relay's count and the native routes' (the endpoints' share).
        python = srv.stats.relayed_datagrams
        native = sum(ep.stats.relay_forwarded for ep in srv.endpoints)
        out: dict[str, Any] = {"cmd": line, "relayed": python + native, "python": python,
                               "native": native, "t": time.perf_counter()}
        if line == "trace-start":
            tracemalloc.start(25)
            state["snap"] = tracemalloc.take_snapshot()
            state["blocks0"] = sys.getallocatedblocks()
        elif line == "trace-stop":
            snap = tracemalloc.take_snapshot()
            out["blocks_delta"] = sys.getallocatedblocks() - state["blocks0"]
            filt = [tracemalloc.Filter(False, tracemalloc.__file__)]
            diff = snap.filter_traces(filt).compare_to(state["snap"].filter_traces(filt),
                                                       "lineno")
            out["count_diff"] = sum(d.count_diff for d in diff)
            out["size_diff"] = sum(d.size_diff for d in diff)
            out["top"] = [{"where": str(d.traceback[0]), "count_diff": d.count_diff,
                           "size_diff": d.size_diff} for d in diff[:10]]
            out["traced_current_peak"] = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        elif line == "prof-start":
            state["prof"] = cProfile.Profile()
            state["prof"].enable()
        elif line == "prof-stop":
            prof: cProfile.Profile = state.pop("prof")
            prof.disable()
            st = pstats.Stats(prof)
            out["total_calls"] = st.total_calls  # type: ignore[attr-defined]
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
            out["top15_text"] = buf.getvalue()
            rows = []
            raw = st.stats  # type: ignore[attr-defined]
            for (fname, lineno, func), (_cc, nc, tt, ct, _) in raw.items():
                rows.append({"func": f"{fname}:{lineno}({func})", "ncalls": nc,
                             "tottime": tt, "cumtime": ct})
            out["top15"] = sorted(rows, key=lambda r: -r["tottime"])[:15]
        print(json.dumps(out), flush=True)
    await srv.stop()


# ---------------------------------------------------------------------- parent
class Child:
    def __init__(self, pki: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", "--pki", pki],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("the Intermediate child did not start")
        self.ports = [int(p) for p in json.loads(line)["ports"]]

    async def cmd(self, text: str) -> dict[str, Any]:
        def talk() -> dict[str, Any]:
            assert self.proc.stdin and self.proc.stdout
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
            return dict(json.loads(self.proc.stdout.readline()))
        return await asyncio.to_thread(talk)

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
        except OSError:
            pass
        procs.stop(self.proc, grace=5, sig=None)  # "quit" ends the child; SIGKILL if not


async def traffic(pki: str, child: Child, seconds: float, trace_rate: float, relay: str) -> dict[str, Any]:
    from ztna.quic.config import TlsFiles, make_configuration
    from ztna.quic.connection import ConnectionHandler
    from ztna.quic.endpoint import QuicEndpoint, bind_udp
    from ztna.wire import Register, Role, encode_control

    class ConnectorH(ConnectionHandler):
        echoed = 0

        def on_datagram(self, conn: Any, data: bytes) -> None:
            if data[:1] == b"\x30":
                # 0x30 01 [agent_id u32][L][service][pkt] -> 0x31 01 [agent_id][pkt]
                slen = data[6]
                conn.send_datagram(b"\x31\x01" + data[2:6] + data[7 + slen:])
                self.echoed += 1

    class AgentH(ConnectionHandler):
        received = 0

        def on_datagram(self, conn: Any, data: bytes) -> None:
            if data[:1] in (b"\x45", b"\x60"):
                self.received += 1

    addr = ("127.0.0.1", child.ports[0])
    # The Connector on the Agent's socket gets native routes; on the other, the Python relay.
    caddr = ("127.0.0.1", child.ports[0 if relay == "native" else 1])
    ep_c = QuicEndpoint(bind_udp("127.0.0.1", 0))
    ep_a = QuicEndpoint(bind_udp("127.0.0.1", 0))
    hc, ha = ConnectorH(), AgentH()
    cc = ep_c.connect(caddr, make_configuration(is_client=True,
                      tls=TlsFiles.from_dir(pki, "connector"), server_name="localhost"), hc)
    cc.send_control(encode_control(Register(role=Role.CONNECTOR, service_id=SERVICE)))
    await asyncio.wait_for(cc.wait_handshake(), 10)
    await asyncio.sleep(0.3)
    ca = ep_a.connect(addr, make_configuration(is_client=True,
                      tls=TlsFiles.from_dir(pki, "agent"), server_name="localhost"), ha)
    ca.send_control(encode_control(Register(role=Role.AGENT, service_id=SERVICE)))
    await asyncio.wait_for(ca.wait_handshake(), 10)
    await asyncio.sleep(0.3)
    sid = SERVICE.encode()
    room = ca.max_datagram_payload() - 7 - len(sid)
    dgram = b"\x2f" + bytes([len(sid)]) + sid + PACKET[:room]
    stop = asyncio.Event()
    pace: dict[str, float | None] = {"rate": None}

    async def pump() -> None:
        while not stop.is_set():
            rate = pace["rate"]
            if rate:  # paced: one packet per 1/rate s, well under what the traced relay takes
                ca.send_datagram(dgram)
                await asyncio.sleep(1 / rate)
                continue
            n = ca.datagram_budget()
            for _ in range(min(n, 32)):
                ca.send_datagram(dgram)
            await asyncio.sleep(0 if n else 0.0005)

    task = asyncio.create_task(pump())
    windows: dict[str, Any] = {}
    try:
        await asyncio.sleep(1.0)  # warm up: windows open, caches filled
        for name, start, end in (("plain", None, None), ("tracemalloc", "trace-start",
                                 "trace-stop"), ("cprofile", "prof-start", "prof-stop")):
            pace["rate"] = trace_rate if name == "tracemalloc" else None
            if name == "tracemalloc":
                await asyncio.sleep(1.5)  # let the flood's queues drain at the paced rate
            a = await child.cmd(start or "stats")
            r0 = ha.received
            await asyncio.sleep(seconds)
            b = await child.cmd(end or "stats")
            fwd = b["relayed"] - a["relayed"]
            dt = b["t"] - a["t"]
            w: dict[str, Any] = {"forwarded": fwd, "forwarded_python": b["python"] - a["python"],
                                 "forwarded_native": b["native"] - a["native"], "seconds": round(dt, 3),
                                 "forwarded_per_s": round(fwd / dt, 1),
                                 "echoes_received": ha.received - r0}
            if name == "tracemalloc":
                w["paced_rate_pps"] = trace_rate
                w["net_blocks_per_packet"] = round(b["count_diff"] / max(fwd, 1), 5)
                w["net_bytes_per_packet"] = round(b["size_diff"] / max(fwd, 1), 3)
                w["allocated_blocks_delta_per_packet"] = round(b["blocks_delta"] / max(fwd, 1), 5)
                w["top_retained"] = b["top"]
                w["traced_current_peak_bytes"] = b["traced_current_peak"]
            if name == "cprofile":
                w["calls_per_packet"] = round(b["total_calls"] / max(fwd, 1), 2)
                w["top15"] = b["top15"]
                w["top15_text"] = b["top15_text"]
            windows[name] = w
    finally:
        stop.set()
        await task
        # Let what is queued drain first: packets still in flight would meet a departed
        # Connector (no connector) or their echoes a departed Agent (bad reply).
        await asyncio.sleep(0.5)
        cc.close(0, "done")
        ca.close(0, "done")
        await asyncio.sleep(0.1)
    windows["packet_bytes"] = len(dgram)
    windows["relay"] = relay
    return windows


def print_report(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    t = Table(title="Intermediate relay hot path (loopback, one agent -> one connector echo, "
                    f"{res['relay']} relay)")
    for col in ("window", "forwarded pkts", "of which native", "pkts/s", "net blocks/pkt",
                "net bytes/pkt", "calls/pkt"):
        t.add_column(col)
    for name in ("plain", "tracemalloc", "cprofile"):
        w = res[name]
        t.add_row(name, str(w["forwarded"]), str(w["forwarded_native"]), f"{w['forwarded_per_s']:.0f}",
                  str(w.get("net_blocks_per_packet", "–")),
                  str(w.get("net_bytes_per_packet", "–")), str(w.get("calls_per_packet", "–")))
    console.print(t)
    console.print("[bold]tracemalloc: retained blocks by line (top 10)[/bold]")
    for e in res["tracemalloc"]["top_retained"]:
        console.print(f"  {e['count_diff']:+6d} blocks {e['size_diff']:+9d} B  {e['where']}",
                      highlight=False)
    console.print("[bold]cProfile of the Intermediate, top 15 by own time[/bold]")
    console.print(res["cprofile"]["top15_text"], highlight=False, markup=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each window")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--trace-rate", type=float, default=50.0,
                    help="agent packets/s during the tracemalloc window (paced so the slowed, "
                         "traced relay never builds queues that would look like retention)")
    ap.add_argument("--relay", choices=("native", "python"), default="native",
                    help="native: Agent and Connector on one socket, so the native core's routes "
                         "forward; python: on two sockets, so every DATAGRAM goes through the "
                         "Python relay (Intermediate.on_datagram)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pki", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        asyncio.run(child_main(args.pki))
        return 0
    from ztna.certs import init_pki

    with tempfile.TemporaryDirectory(prefix="ztna-hotpath-") as tmp:
        pki = os.path.join(tmp, "pki")
        init_pki(pki, [SERVICE], ["localhost"], days=1)
        child = Child(pki)
        try:
            res = asyncio.run(traffic(pki, child, args.seconds, args.trace_rate, args.relay))
        finally:
            child.close()
    res["python"] = sys.version.split()[0]
    res["cpu_count"] = os.cpu_count()
    res["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print_report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
