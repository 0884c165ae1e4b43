#!/usr/bin/env python3
"""qh3 vs aioquic for the client roles: DATAGRAM relay throughput through a real Intermediate.

HISTORICAL (aioquic era, up to commit 4dde96d): on the native core the "aioquic" loop below is
ztna.quic's native core, and the numbers are not what the labels say; see bench/README.md.

    .venv/bin/python bench/qh3_clients.py --seconds 6 --json bench/results/qh3_clients.json

Needs `pip install qh3` (trial only; not a project dependency). One real Intermediate
(aioquic, the server role stays aioquic: qh3 has no server mTLS) in a child process on
loopback, from bench/hotpath_alloc.py. For each client library, side by side in one run:
a Connector client (registers `bench`, echoes each 0x30 as 0x31) and an Agent client
(registers, sends 1,2xx-byte `0x2F` DATAGRAMs as fast as its congestion window allows).
Reports echoed packets/s at the Agent (= round trips through the relay), Mbit/s one way,
and the client process's CPU µs per relayed packet (both clients share this process).

The qh3 client loop does what a qh3 backend of `ztna.quic` would have to do (the traps in
the shared quic-libraries notes): DATAGRAMs gated on `_core.congestion_window -
_core.bytes_in_flight` (qh3 does not congestion-control them), payload checked against
`_core.active_path[5]` minus a margin, `datagrams_to_send()` wrapped against
`QuicConnectionError` (after which the connection is dead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hotpath_alloc import PACKET, SERVICE, Child  # noqa: E402

QH3_MARGIN = 8  # the Rust core may use longer packet numbers than our formula assumes


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Qh3Client:
    """A minimal batching socket loop around one qh3 client connection."""

    def __init__(self, pki: str, name: str, addr: tuple[str, int], on_datagram: Any) -> None:
        from qh3.quic.configuration import QuicConfiguration
        from qh3.quic.connection import QuicConnection

        from ztna import limits

        cfg = QuicConfiguration(is_client=True, alpn_protocols=[limits.ALPN],
                                connection_id_length=limits.CONNECTION_ID_LENGTH,
                                idle_timeout=30.0, max_datagram_frame_size=65536,
                                server_name="localhost")
        cfg.load_cert_chain(f"{pki}/{name}.pem", f"{pki}/{name}.key")
        cfg.load_verify_locations(f"{pki}/ca.pem")
        self.quic = QuicConnection(configuration=cfg)
        self.addr = addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.on_datagram = on_datagram
        self.pending: deque[bytes] = deque()
        self.dead = False
        self.handshake = self.loop.create_future()
        self.timer: asyncio.TimerHandle | None = None
        self.quic.connect(addr, now=self.loop.time())
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.flush()

    def max_payload(self) -> int:
        core = self.quic._core
        size = core.active_path[5] - (1 + 20 + 2 + 16) - 3 - QH3_MARGIN
        remote = getattr(self.quic, "_remote_max_datagram_frame_size", None)
        if remote:
            size = min(size, remote - 3 - 1)
        return size

    def budget(self) -> int:
        core = self.quic._core
        free = core.congestion_window - core.bytes_in_flight
        return max(0, free // 1350 - len(self.pending))

    def send_datagram(self, data: bytes) -> None:
        self.pending.append(data)

    def _readable(self) -> None:
        from qh3.quic import events

        now = self.loop.time()
        for _ in range(512):
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                break
            self.quic.receive_datagram(data, addr, now)
        while (ev := self.quic.next_event()) is not None:
            if isinstance(ev, events.DatagramFrameReceived):
                self.on_datagram(self, ev.data)
            elif isinstance(ev, events.HandshakeCompleted) and not self.handshake.done():
                self.handshake.set_result(True)
        self.flush()

    def flush(self) -> None:
        from qh3.quic.connection import QuicConnectionError

        if self.dead:
            return
        core = self.quic._core
        if core is not None and self.pending:
            # Gate on the window ourselves: qh3 sends DATAGRAMs regardless of it.
            free = core.congestion_window - core.bytes_in_flight
            limit = self.max_payload()
            while self.pending and free > 0:
                d = self.pending.popleft()
                if len(d) <= limit:
                    self.quic.send_datagram_frame(d)
                    free -= len(d) + 60
        try:
            out = self.quic.datagrams_to_send(now=self.loop.time())
        except QuicConnectionError:
            self.dead = True
            return
        for data, addr in out:
            try:
                self.sock.sendto(data, addr)
            except BlockingIOError:
                pass
        at = self.quic.get_timer()
        if self.timer:
            self.timer.cancel()
        self.timer = self.loop.call_at(at, self._on_timer) if at is not None else None

    def _on_timer(self) -> None:
        self.timer = None
        self.quic.handle_timer(self.loop.time())
        self.flush()

    def control(self, frame: bytes) -> None:
        self.quic.send_stream_data(0, frame)
        self.flush()

    def close(self) -> None:
        self.quic.close()
        self.flush()
        self.loop.remove_reader(self.sock.fileno())
        if self.timer:
            self.timer.cancel()
        self.sock.close()


async def run_aioquic(pki: str, port: int, seconds: float) -> dict[str, Any]:
    from ztna.quic.config import TlsFiles, make_configuration
    from ztna.quic.connection import ConnectionHandler
    from ztna.quic.endpoint import QuicEndpoint, bind_udp
    from ztna.wire import Register, Role, encode_control

    class ConnectorH(ConnectionHandler):
        def on_datagram(self, conn: Any, data: bytes) -> None:
            if data[:1] == b"\x30":
                conn.send_datagram(b"\x31\x01" + data[2:6] + data[7 + data[6]:])

    class AgentH(ConnectionHandler):
        received = 0

        def on_datagram(self, conn: Any, data: bytes) -> None:
            self.received += 1

    addr = ("127.0.0.1", port)
    ep_c, ep_a = QuicEndpoint(bind_udp("127.0.0.1", 0)), QuicEndpoint(bind_udp("127.0.0.1", 0))
    ha = AgentH()
    cc = ep_c.connect(addr, make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "connector"),
                                               server_name="localhost"), ConnectorH())
    cc.send_control(encode_control(Register(role=Role.CONNECTOR, service_id=SERVICE)))
    await asyncio.wait_for(cc.wait_handshake(), 10)
    await asyncio.sleep(0.3)
    ca = ep_a.connect(addr, make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "agent"),
                                               server_name="localhost"), ha)
    ca.send_control(encode_control(Register(role=Role.AGENT, service_id=SERVICE)))
    await asyncio.wait_for(ca.wait_handshake(), 10)
    await asyncio.sleep(0.3)
    sid = SERVICE.encode()
    dgram = b"\x2f" + bytes([len(sid)]) + sid + PACKET[: ca.max_datagram_payload() - 7 - len(sid)]

    async def pump(stop: asyncio.Event) -> None:
        while not stop.is_set():
            n = ca.datagram_budget()
            for _ in range(min(n, 32)):
                ca.send_datagram(dgram)
            await asyncio.sleep(0 if n else 0.0005)

    res = await measure(lambda: ha.received, pump, seconds, len(dgram))
    ca.close(0, "done")
    cc.close(0, "done")
    await asyncio.sleep(0.1)
    return res


async def run_qh3(pki: str, port: int, seconds: float) -> dict[str, Any]:
    from ztna.wire import Register, Role, encode_control

    addr = ("127.0.0.1", port)
    got = {"n": 0}

    def conn_dgram(c: Qh3Client, data: bytes) -> None:
        if data[:1] == b"\x30":
            c.send_datagram(b"\x31\x01" + data[2:6] + data[7 + data[6]:])

    def agent_dgram(c: Qh3Client, data: bytes) -> None:
        got["n"] += 1

    qc = Qh3Client(pki, "connector", addr, conn_dgram)
    qc.control(encode_control(Register(role=Role.CONNECTOR, service_id=SERVICE)))
    await asyncio.wait_for(qc.handshake, 10)
    await asyncio.sleep(0.3)
    qa = Qh3Client(pki, "agent", addr, agent_dgram)
    qa.control(encode_control(Register(role=Role.AGENT, service_id=SERVICE)))
    await asyncio.wait_for(qa.handshake, 10)
    await asyncio.sleep(0.3)
    sid = SERVICE.encode()
    # The Intermediate relays at most its own max payload onwards: match the aioquic run's size.
    room = min(qa.max_payload(), 1350 - (1 + 20 + 2 + 16) - 3) - 7 - len(sid)
    dgram = b"\x2f" + bytes([len(sid)]) + sid + PACKET[:room]

    async def pump(stop: asyncio.Event) -> None:
        while not stop.is_set():
            n = qa.budget()
            for _ in range(min(n, 32)):
                qa.send_datagram(dgram)
            qa.flush()
            await asyncio.sleep(0 if n else 0.0005)

    res = await measure(lambda: got["n"], pump, seconds, len(dgram))
    res["qh3_dead"] = {"agent": qa.dead, "connector": qc.dead}
    qa.close()
    qc.close()
    return res


async def measure(received: Any, pump: Any, seconds: float, size: int) -> dict[str, Any]:
    stop = asyncio.Event()
    task = asyncio.create_task(pump(stop))
    await asyncio.sleep(1.0)
    r0, c0, t0 = received(), cpu_s(), time.perf_counter()
    await asyncio.sleep(seconds)
    r1, c1, t1 = received(), cpu_s(), time.perf_counter()
    stop.set()
    await task
    n = r1 - r0
    return {"echoed_pps": round(n / (t1 - t0)), "mbit_s_one_way": round(n * size * 8 / (t1 - t0) / 1e6, 1),
            "client_cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 1),
            "client_us_per_echo": round(1e6 * (c1 - c0) / max(n, 1), 1), "datagram_bytes": size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    from ztna.certs import init_pki

    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    with tempfile.TemporaryDirectory(prefix="ztna-qh3-") as tmp:
        pki = os.path.join(tmp, "pki")
        init_pki(pki, [SERVICE], ["localhost"], days=1)
        child = Child(pki)
        try:
            for _ in range(args.rounds):
                for lib, fn in (("aioquic", run_aioquic), ("qh3", run_qh3)):
                    a = asyncio.run(child.cmd("stats"))
                    res = asyncio.run(fn(pki, child.port, args.seconds))
                    b = asyncio.run(child.cmd("stats"))
                    res["client"] = lib
                    res["relay_forwarded"] = b["relayed"] - a["relayed"]
                    print(json.dumps(res), flush=True)
                    out["runs"].append(res)
        finally:
            child.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
