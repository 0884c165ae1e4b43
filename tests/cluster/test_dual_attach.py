"""A Connector attached to two members at once (`--attach all`): an Agent on I1 and an
Agent on I2 both reach it byte-exact on both carriages (TCP in a stream through `-L`, UDP
in DATAGRAMs through `-U`), each through its own member (no mesh). Two clients that the two
members give the same agent id (same certificate, same `Hello.instance`) send UDP with the
same inner 5-tuple, and each gets only its own answers. Then SIGKILL I1: the Agent on I2
goes on without a gap (a TCP connection held open and UDP keep echoing), and the Agent on
I1 fails over to I2 and works again. Real processes: redis-server, two `ztna intermediate`,
`ztna connector`, two `ztna agent` (userspace)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import RedisProc, echo_through, member
from intermediate_helpers import Peer, free_tcp_port, free_udp_port

from ztna.certs import init_pki, issue
from ztna.netstack.packets import build_udp_packet, parse_ip, parse_udp
from ztna.procs import await_until
from ztna.quic.config import TlsFiles
from ztna.wire import Hello, RegistrationAck, Role, encode_control, encode_service_datagram

pytestmark = pytest.mark.timeout(240)

ZTNA = [sys.executable, "-m", "ztna"]
VIP = bytes([10, 100, 0, 2])


def get_json(port: int, path: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:       # 503 carries the same detail
        return json.loads(exc.read())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def agent_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class Answers(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.put_nowait(data)



async def udp_echo(port: int, tries: int = 1, timeout: float = 1.0) -> bool:
    """One random datagram through the Agent's `-U` forward; True if it came back as sent."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Answers, remote_addr=("127.0.0.1", port))
    try:
        body = os.urandom(200)
        for _ in range(tries):
            transport.sendto(body)
            try:
                while (await asyncio.wait_for(proto.got.get(), timeout)) != body:
                    pass
                return True
            except TimeoutError:
                continue
        return False
    finally:
        transport.close()


class HelloPeer(Peer):
    """A client that says `Hello(instance)` first, as the Agent does: its agent id on a member
    is then derived from its certificate and that instance, the same on every member."""

    async def hello_agent(self, host: str, port: int, tls: TlsFiles, instance: int) -> HelloPeer:
        await self.connect(host, port, tls)
        assert self.conn is not None
        self.conn.send_control(encode_control(Hello(instance=instance)))
        assert isinstance(await self.register(Role.AGENT, "echo"), RegistrationAck)
        return self


def test_connector_on_two_members_survives_either(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["echo"])
    issue(pki, "agent", "agent-2", ["echo"], out_prefix=pki / "agent-2")
    issue(pki, "member", "member", out_prefix=pki / "member")
    redis = RedisProc(tmp_path / "redis").start()
    i1 = member(pki, redis, tmp_path / "i1.log").start()
    i2 = member(pki, redis, tmp_path / "i2.log").start()
    procs: list[subprocess.Popen[bytes]] = []
    logs = []

    def spawn(name: str, *args: str) -> None:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        logs.append(log)
        procs.append(subprocess.Popen([*ZTNA, *args], stdout=log, stderr=subprocess.STDOUT))

    def text(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        tcp_backend = await asyncio.start_server(handle, "127.0.0.1", 0)
        tport = tcp_backend.sockets[0].getsockname()[1]
        udp_backend, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        uport = udp_backend.get_extra_info("sockname")[1]
        cm = free_tcp_port()
        spawn("connector", "connector", "--intermediate", f"127.0.0.1:{i1.port},127.0.0.1:{i2.port}",
              "--attach", "all", "--server-name", "localhost", "--pki", str(pki), "--p2p-port", "off",
              "--metrics", f"127.0.0.1:{cm}",
              "--service", f"echo=10.100.0.2;tcp:7=127.0.0.1:{tport};udp:7=127.0.0.1:{uport}")
        fwd = {"a": (free_tcp_port(), free_udp_port(), free_tcp_port()),
               "b": (free_tcp_port(), free_udp_port(), free_tcp_port())}
        for name, cert, inter in (("a", "agent", f"127.0.0.1:{i1.port},127.0.0.1:{i2.port}"),
                                  ("b", "agent-2", f"127.0.0.1:{i2.port}")):
            lport, udp, mport = fwd[name]
            spawn(f"agent-{name}", "agent", "--mode", "userspace", "--intermediate", inter, "--pick", "first",
                  "--server-name", "localhost", "--cert", str(pki / f"{cert}.pem"),
                  "--key", str(pki / f"{cert}.key"), "--ca", str(pki / "ca.pem"),
                  "--service", "echo=10.100.0.2", "-L", f"127.0.0.1:{lport}=echo:7",
                  "-U", f"127.0.0.1:{udp}=echo:7", "--metrics", f"127.0.0.1:{mport}",
                  "--state-dir", str(tmp_path / f"agent-{name}-state"))

        def relays() -> list[dict[str, Any]]:
            return get_json(cm, "/healthz").get("relays") or []

        async def both_links_registered() -> bool:
            return len(relays()) == 2 and all(r["services"] == {"echo": "registered"} for r in relays())

        deadline = time.monotonic() + 30       # for the links and both Agents together
        await await_until(both_links_registered, timeout=30, what="both links registered",
                          error=AssertionError, detail=lambda: text("connector"))
        assert agent_metrics(cm)["ztna_connector_relay_links_connected"] == 2
        for name in ("a", "b"):
            lport, udp, _ = fwd[name]

            async def echoes(lport: int = lport, udp: int = udp) -> bool:
                return await echo_through(lport, 100_000) and await udp_echo(udp)

            await await_until(echoes, timeout=deadline - time.monotonic(), what=f"agent-{name} echoes",
                              interval=0.5, error=AssertionError,
                              detail=lambda name=name: text(f"agent-{name}"))
        # Each Agent is served by the Connector's link to its own member: nothing crossed the mesh.
        for proc in (i1, i2):
            assert proc.metrics().get('ztna_mesh_streams_total{direction="forwarded"}', 0) == 0
            assert proc.metrics().get('ztna_mesh_datagrams_total{direction="forwarded"}', 0) == 0

        # The same agent id from both members, the same inner 5-tuple: two flows, no cross-talk.
        twins = [await HelloPeer().hello_agent("127.0.0.1", proc.port, TlsFiles.from_dir(pki, "agent"),
                                               instance=0x5EED) for proc in (i1, i2)]
        sent: list[list[bytes]] = [[], []]
        for n in range(30):
            for k, twin in enumerate(twins):
                payload = os.urandom(20 + n * 17) + bytes([k])
                sent[k].append(payload)
                assert twin.conn is not None
                twin.conn.send_datagram(encode_service_datagram(
                    "echo", build_udp_packet(bytes([10, 1, 2, 3]), VIP, 40000, 7, payload)))
            await asyncio.sleep(0.005)

        def answers(twin: Peer) -> list[bytes]:
            out = []
            for d in twin.datagrams:
                if d and d[0] >> 4 == 4:
                    ip = parse_ip(d)
                    out.append(bytes(parse_udp(d, ip).payload))
            return out

        for _ in range(300):
            if all(len(answers(t)) >= 30 for t in twins):
                break
            await asyncio.sleep(0.02)
        for k, twin in enumerate(twins):
            assert sorted(answers(twin)) == sorted(sent[k]), (k, len(answers(twin)))
        for twin in twins:
            await twin.close()

        # Agent B (on I2) holds a TCP connection open and echoes through it and through UDP
        # all along, while I1 is killed and Agent A moves over.
        lport_b, udp_b, _ = fwd["b"]
        reader, writer = await asyncio.open_connection("127.0.0.1", lport_b)
        gaps: list[str] = []
        rounds = 0

        async def keep_echoing(until: asyncio.Event) -> None:
            nonlocal rounds
            while not until.is_set():
                chunk = os.urandom(4096)
                writer.write(chunk)
                await writer.drain()
                try:
                    got = await asyncio.wait_for(reader.readexactly(len(chunk)), 3)
                except (TimeoutError, asyncio.IncompleteReadError) as exc:
                    gaps.append(f"tcp round {rounds}: {exc!r}")
                    return
                if got != chunk:
                    gaps.append(f"tcp round {rounds}: other bytes")
                    return
                if not await udp_echo(udp_b, tries=2):
                    gaps.append(f"udp round {rounds}: no answer within 2 s")
                rounds += 1
                await asyncio.sleep(0.1)

        done = asyncio.Event()
        probe = asyncio.create_task(keep_echoing(done))
        await asyncio.sleep(1.0)
        i1.signal(signal.SIGKILL)
        killed = time.monotonic()
        lport_a, udp_a, mport_a = fwd["a"]

        async def a_echoes() -> bool:
            return await echo_through(lport_a, 100_000, timeout=2) and await udp_echo(udp_a)

        await await_until(a_echoes, timeout=30, what="agent-a back after the SIGKILL",
                          error=AssertionError, detail=lambda: text("agent-a"))
        back = time.monotonic() - killed
        await asyncio.sleep(1.0)
        done.set()
        await probe
        writer.close()
        assert gaps == [], gaps
        assert rounds >= 5
        assert agent_metrics(mport_a)["ztna_agent_failovers_total"] >= 1
        print(f"agent A back {back:.1f} s after SIGKILL of I1; agent B: {rounds} echo rounds, no gap")
        tcp_backend.close()
        udp_backend.close()

    try:
        asyncio.run(main())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
        i1.stop()
        i2.stop()
        redis.kill()
