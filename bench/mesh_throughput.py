"""Relayed throughput across the cluster mesh against a single Intermediate, on loopback.

Real processes: redis-server, two `ztna intermediate --cluster` members (I1, I2, with member
certificates), `ztna connector` attached to I2 with a TCP sink and a UDP echo backend (a
separate Python process). The measuring Agent (in this process, on the QUIC adapter) attaches
either to I2 ("single": Agent and Connector on one Intermediate) or to I1 ("mesh": every byte
crosses I1 → I2). Two such clusters run side by side in one run: one as shipped ("mesh,
native routes": DATAGRAMs on the native mesh routes, streams spliced natively on both members)
and one with ZTNA_PYTHON_MESH=1 ("mesh, Python": the mesh as it was before, every DATAGRAM
through Python on both members). Rows:

* stream upload: one TCP-carrying stream of `--mbytes` MB, the sink answers with the sha256
  of what it got (checked), Mbit/s from the first byte to the answer;
* datagram echo: `--packets` UDP packets of 1000 bytes in DATAGRAMs, 64 in flight, echoed by
  the backend; packets/s, the share that came back, the CPU time the Intermediates it crossed
  spent per echoed packet (both members for the mesh rows; /proc), and how many of the
  packets crossed the mesh on native routes (the Agent's member's metrics).

    python bench/mesh_throughput.py --mbytes 50 --packets 20000 --json bench/results/mesh.json

Needs redis-server (Debian package). No root. Numbers on a shared 2-core machine are noisy:
run it a few times and compare the rows of one run with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from ztna.certs import init_pki, issue
from ztna.netstack.packets import build_udp_packet
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.wire import (
    Register,
    RegistrationAck,
    Role,
    StreamOpen,
    encode_control,
    encode_service_datagram,
    encode_stream_open,
)

ZTNA = [sys.executable, "-m", "ztna"]

BACKENDS = r'''
import asyncio, hashlib, sys
async def sink(r, w):
    h = hashlib.sha256()
    while data := await r.read(1 << 16):
        h.update(data)
    w.write(h.hexdigest().encode()); await w.drain(); w.close()
class Echo(asyncio.DatagramProtocol):
    def connection_made(self, t): self.t = t
    def datagram_received(self, d, a): self.t.sendto(d, a)
async def main():
    srv = await asyncio.start_server(sink, "127.0.0.1", int(sys.argv[1]))
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", int(sys.argv[2])))
    await asyncio.Event().wait()
asyncio.run(main())
'''


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mesh_counts(metrics_port: int) -> tuple[float, float]:
    """(DATAGRAMs this member forwarded across the mesh, those of them on native routes)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
        text = r.read().decode()
    found = {"ztna_mesh_datagrams_total": 0.0, "ztna_mesh_native_datagrams_total": 0.0}
    for line in text.splitlines():
        name, _, rest = line.partition('{direction="forwarded"} ')
        if name in found and rest:
            found[name] = float(rest)
    return found["ztna_mesh_datagrams_total"], found["ztna_mesh_native_datagrams_total"]


class Agent(ConnectionHandler):
    def __init__(self) -> None:
        self.messages: list[object] = []
        self.replies: dict[int, bytearray] = {}
        self.ended: dict[int, asyncio.Event] = {}
        self.echoed = 0
        self.conn: ZtnaConnection | None = None

    async def connect(self, port: int, pki: Path) -> Agent:
        ep = QuicEndpoint(bind_udp("0.0.0.0", 0))
        cfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "agent"), server_name="localhost")
        self.conn = ep.connect(("127.0.0.1", port), cfg, self)
        self.conn.send_control(encode_control(Register(role=Role.AGENT, service_id="echo")))
        for _ in range(500):
            if any(isinstance(m, RegistrationAck) for m in self.messages):
                return self
            await asyncio.sleep(0.01)
        raise RuntimeError("not registered")

    def on_message(self, conn: ZtnaConnection, msg: object) -> None:
        self.messages.append(msg)

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        if data and data[0] >> 4 == 4:
            self.echoed += 1

    def on_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool) -> None:
        self.replies.setdefault(sid, bytearray()).extend(data)
        conn.consume_stream(sid, len(data))
        if end:
            self.ended.setdefault(sid, asyncio.Event()).set()

    async def upload(self, size: int) -> float:
        conn = self.conn
        assert conn is not None
        chunk = os.urandom(1 << 16)
        digest = hashlib.sha256()
        sid = conn.open_stream()
        done = self.ended.setdefault(sid, asyncio.Event())
        start = time.monotonic()
        conn.send_stream(sid, encode_stream_open(StreamOpen("echo", "10.100.0.2", 7)))
        sent = 0
        while sent < size:
            while conn.stream_send_backlog(sid) > 4 << 20:
                await asyncio.sleep(0.001)
            piece = chunk[: min(len(chunk), size - sent)]
            conn.send_stream(sid, piece)
            digest.update(piece)
            sent += len(piece)
        conn.send_stream(sid, b"", end=True)
        await asyncio.wait_for(done.wait(), 300)
        seconds = time.monotonic() - start
        reply = bytes(self.replies[sid])
        if reply[:1] != b"\x00" or reply[1:].decode() != digest.hexdigest():
            raise RuntimeError(f"the sink got other bytes: {reply[:80]!r}")
        return seconds

    async def echo(self, count: int, window: int = 64) -> tuple[float, int]:
        conn = self.conn
        assert conn is not None
        payload = os.urandom(1000)
        self.echoed = 0
        start = time.monotonic()
        sent = 0
        while sent < count:
            if sent - self.echoed < window:
                pkt = build_udp_packet(bytes([100, 64, 0, 1]), bytes([10, 100, 0, 2]), 5000, 7, payload)
                conn.send_datagram(encode_service_datagram("echo", pkt))
                sent += 1
            else:
                await asyncio.sleep(0)
                if time.monotonic() - start > 120:
                    break
            if sent % 32 == 0:
                await asyncio.sleep(0)
        deadline = time.monotonic() + 2
        while self.echoed < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return time.monotonic() - start, self.echoed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mbytes", type=int, default=50)
    ap.add_argument("--packets", type=int, default=20000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is needed (apt-get install redis-server)")
    work = Path(tempfile.mkdtemp(prefix="ztna-mesh-bench-"))
    pki = work / "pki"
    init_pki(pki, ["echo"])
    issue(pki, "member", "member", out_prefix=pki / "member")
    procs: list[subprocess.Popen[bytes]] = []

    by_name: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        by_name[name] = procs[-1]

    try:
        rport = free_port(socket.SOCK_STREAM)
        spawn("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(rport), "--dir", str(work),
                        "--save", "", "--appendonly", "no"])
        tport, uport = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
        spawn("backends", [sys.executable, "-c", BACKENDS, str(tport), str(uport)])
        clusters: dict[str, list[tuple[int, int]]] = {}
        for db, variant in enumerate(("native", "python")):
            env = dict(os.environ)
            if variant == "python":
                env["ZTNA_PYTHON_MESH"] = "1"
            members = clusters[variant] = []
            for name in ("i1", "i2"):
                port, mport = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
                time.sleep(0.2)
                spawn(f"{variant}-{name}", [
                    *ZTNA, "intermediate", "--pki", str(pki), "--listen", f"127.0.0.1:{port}",
                    "--metrics", f"127.0.0.1:{mport}", "--cluster", f"redis://127.0.0.1:{rport}/{db}",
                    "--advertise", f"127.0.0.1:{port}", "--handshakes-per-second", "1000"], env)
                wait_http(f"http://127.0.0.1:{mport}/healthz")
                members.append((port, mport))
            spawn(f"{variant}-connector", [
                *ZTNA, "connector", "--intermediate", f"127.0.0.1:{members[1][0]}",
                "--server-name", "localhost", "--pki", str(pki), "--p2p-port", "off", "--metrics", "off",
                "--service", f"echo=10.100.0.2;tcp:7=127.0.0.1:{tport};udp:7=127.0.0.1:{uport}"], env)
        time.sleep(6)        # the Connectors register and each I1's view (2 s refresh) learns of it
        rows: list[dict[str, Any]] = []
        # (label, the member the Agent attaches to, the members its DATAGRAMs cross)
        paths = (("single", clusters["native"][1], ["native-i2"]),
                 ("mesh, Python", clusters["python"][0], ["python-i1", "python-i2"]),
                 ("mesh, native routes", clusters["native"][0], ["native-i1", "native-i2"]))

        async def measure() -> None:
            for label, (port, mport), crossed in paths:
                before = mesh_counts(mport)
                agent = await Agent().connect(port, pki)
                await agent.upload(1 << 20)                       # warm-up
                seconds = await agent.upload(args.mbytes << 20)
                cpu = sum(cpu_seconds(by_name[n].pid) for n in crossed)
                dseconds, echoed = await agent.echo(args.packets)
                cpu = sum(cpu_seconds(by_name[n].pid) for n in crossed) - cpu
                rows.append({"path": label, "stream_mbit_s": round(args.mbytes * 8 * 1.048576 / seconds, 1),
                             "stream_seconds": round(seconds, 2),
                             "datagram_echo_pps": round(echoed / dseconds),
                             "datagram_echoed": f"{echoed}/{args.packets}",
                             "intermediate_cpu_us_per_packet": round(cpu * 1e6 / max(1, echoed), 1)})
                after = mesh_counts(mport)
                rows[-1]["mesh_forwarded"] = after[0] - before[0]
                rows[-1]["mesh_forwarded_native"] = after[1] - before[1]
                assert agent.conn is not None
                agent.conn.close()
                await asyncio.sleep(0.2)

        asyncio.run(measure())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    print("| path | stream upload Mbit/s | DATAGRAM echo packets/s (1000 B, 64 in flight) | echoed "
          "| Intermediate CPU µs per echoed packet | DATAGRAMs across the mesh (on native routes) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['path']} | {r['stream_mbit_s']} | {r['datagram_echo_pps']} | {r['datagram_echoed']} "
              f"| {r['intermediate_cpu_us_per_packet']} "
              f"| {r['mesh_forwarded']:.0f} ({r['mesh_forwarded_native']:.0f}) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "mbytes": args.mbytes, "packets": args.packets}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
