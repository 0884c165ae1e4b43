"""The mesh between real member processes: an Agent on I1 reaches a Connector on I2 byte for
byte (DATAGRAM carriage, 0x32/0x33), two Agents on I1 never see each other's answers, and a
member certificate is a mesh peer only (it cannot register as an Agent or a Connector)."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path

import pytest
from cluster_helpers import IntermediateProc, Peer, RedisProc, member

from ztna import limits
from ztna.certs import init_pki, issue
from ztna.netstack.packets import build_udp_packet, parse_ip, parse_udp
from ztna.quic.config import TlsFiles
from ztna.wire import (
    AgentGone,
    RegistrationAck,
    RegistrationNack,
    Role,
    ServiceStatus,
    encode_service_datagram,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["echo"])
    issue(d, "agent", "agent-2", ["echo"], out_prefix=d / "agent-2")
    issue(d, "member", "member", out_prefix=d / "member")
    return d


def services(proc: IntermediateProc) -> dict[str, dict[str, object]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/healthz", timeout=2) as r:
        return json.loads(r.read())["cluster"]["services"]  # type: ignore[no-any-return]


async def until_placed(proc: IntermediateProc, service: str) -> None:
    for _ in range(int((limits.CLUSTER_LEASE_REFRESH * 3 + 2) / 0.1)):
        if services(proc).get(service, {}).get("connectors"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{service} never showed up in the view")


def packet(src: int, sport: int, payload: bytes) -> bytes:
    return build_udp_packet(bytes([10, 1, 2, src]), bytes([10, 9, 9, 9]), sport, 9999, payload)


def test_agent_on_one_member_reaches_a_connector_on_another(
        pki: Path, cluster: tuple[IntermediateProc, IntermediateProc]) -> None:
    i1, i2 = cluster

    async def main() -> None:
        connector = await Peer(echo=True).connect("127.0.0.1", i2.port, TlsFiles.from_dir(pki, "connector"))
        assert isinstance(await connector.register(Role.CONNECTOR, "echo"), RegistrationAck)
        a = await Peer().connect("127.0.0.1", i1.port, TlsFiles.from_dir(pki, "agent"))
        b = await Peer().connect("127.0.0.1", i1.port, TlsFiles.from_dir(pki, "agent-2"))
        for agent in (a, b):
            assert isinstance(await agent.register(Role.AGENT, "echo"), RegistrationAck)
        await until_placed(i1, "echo")
        # Told "down" on registering (no Connector on I1), then "up": it is served on I2.
        for agent in (a, b):
            status = await agent.wait_message(lambda m: isinstance(m, ServiceStatus) and m.up, 5)
            assert isinstance(status, ServiceStatus)
            assert status.connector is not None and status.connector.startswith(f"127.0.0.1:{i2.port}/connector#")
        sent: dict[Peer, list[bytes]] = {a: [], b: []}
        for n in range(40):
            for agent, src in ((a, 1), (b, 2)):
                payload = os.urandom(16 + n * 29)          # up to 1147 bytes, random
                sent[agent].append(payload)
                assert agent.conn is not None
                agent.conn.send_datagram(encode_service_datagram("echo", packet(src, 4000 + n, payload)))
            await asyncio.sleep(0.005)
        def answers(p: Peer) -> list[bytes]:
            return [d for d in p.datagrams if d[0] >> 4 == 4]   # not the QAD (0x01)

        for _ in range(300):
            if all(len(answers(p)) >= 40 for p in (a, b)):
                break
            await asyncio.sleep(0.02)
        for agent, src in ((a, 1), (b, 2)):
            got = []
            for d in answers(agent):
                ip = parse_ip(d)
                assert ip.dst == bytes([10, 1, 2, src])    # only its own answers
                got.append(bytes(parse_udp(d, ip).payload))
            assert sorted(got) == sorted(sent[agent]), (len(got), len(sent[agent]))
        assert connector.echoed == 80
        # The Agents leave I1: I2 hears it over the mesh and tells its Connector.
        for p in (a, b):
            await p.close()
        for _ in range(200):
            if len({m.agent for m in connector.messages if isinstance(m, AgentGone)}) == 2:
                break
            await asyncio.sleep(0.02)
        assert len({m.agent for m in connector.messages if isinstance(m, AgentGone)}) == 2
        await connector.close()

    asyncio.run(main())
    m1, m2 = i1.metrics(), i2.metrics()
    assert m1['ztna_mesh_datagrams_total{direction="forwarded"}'] == 80
    assert m1['ztna_mesh_datagrams_total{direction="delivered"}'] == 80
    assert m2['ztna_mesh_datagrams_total{direction="received"}'] == 80
    assert m2['ztna_mesh_datagrams_total{direction="replied"}'] == 80
    assert m1["ztna_mesh_links_opened_total"] == 1
    assert m1.get('ztna_relay_dropped_total{reason="no_connector"}', 0) == 0


def test_a_member_certificate_is_a_mesh_peer_only(
        pki: Path, cluster: tuple[IntermediateProc, IntermediateProc]) -> None:
    i1, _ = cluster

    async def main() -> None:
        peer = await Peer().connect("127.0.0.1", i1.port, TlsFiles.from_dir(pki, "member"))
        for role in (Role.AGENT, Role.CONNECTOR):
            reply = await peer.register(role, "echo")
            assert isinstance(reply, RegistrationNack), reply
        await peer.close()

    asyncio.run(main())
    assert i1.metrics().get("ztna_registrations_total", 0) == 0


def test_both_carriages_to_a_real_connector_on_another_member(
        pki: Path, cluster: tuple[IntermediateProc, IntermediateProc], tmp_path: Path) -> None:
    """`ztna connector` (a real process) on I2 with real TCP and UDP backends; an Agent on I1
    sends UDP in DATAGRAMs and opens TCP-carrying streams: every byte comes back."""
    import hashlib
    import subprocess
    import sys

    from ztna.wire import StreamOpen, encode_stream_open

    i1, i2 = cluster

    async def main() -> None:
        async def tcp_handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            digest = hashlib.sha256()
            while data := await r.read(65536):
                digest.update(data)
            w.write(digest.hexdigest().encode())        # the sink answers with what it got
            await w.drain()
            w.close()

        tcp = await asyncio.start_server(tcp_handle, "127.0.0.1", 0)
        tcp_port = tcp.sockets[0].getsockname()[1]

        class UdpEcho(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.t.sendto(data, addr)  # type: ignore[attr-defined]

        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
        udp_port = udp.get_extra_info("sockname")[1]
        log = open(tmp_path / "connector.log", "wb")  # noqa: SIM115
        connector = subprocess.Popen(
            [sys.executable, "-m", "ztna", "connector", "--intermediate", f"127.0.0.1:{i2.port}",
             "--server-name", "localhost", "--pki", str(pki), "--p2p-port", "off", "--metrics", "off",
             "--service", f"echo=10.100.0.2;tcp:7=127.0.0.1:{tcp_port};udp:7=127.0.0.1:{udp_port}"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            agent = await Peer().connect("127.0.0.1", i1.port, TlsFiles.from_dir(pki, "agent"))
            assert isinstance(await agent.register(Role.AGENT, "echo"), RegistrationAck)
            await until_placed(i1, "echo")
            conn = agent.conn
            assert conn is not None
            # Streams: three uploads of different sizes, each answered with its sha256.
            replies: dict[int, bytearray] = {}
            ended: set[int] = set()
            orig = agent.on_stream_data if hasattr(agent, "on_stream_data") else None
            assert orig is not None

            def on_stream_data(c: object, sid: int, data: bytes, end: bool) -> None:
                replies.setdefault(sid, bytearray()).extend(data)
                c.consume_stream(sid, len(data))  # type: ignore[attr-defined]
                if end:
                    ended.add(sid)

            agent.on_stream_data = on_stream_data  # type: ignore[method-assign]
            want: dict[int, str] = {}
            for size in (1, 70_000, 3_000_000):
                body = os.urandom(size)
                sid = conn.open_stream()
                conn.send_stream(sid, encode_stream_open(StreamOpen("echo", "10.100.0.2", 7)))
                for off in range(0, size, 32768):
                    while conn.stream_send_backlog(sid) > 1 << 20:
                        await asyncio.sleep(0.002)
                    conn.send_stream(sid, body[off:off + 32768])
                conn.send_stream(sid, b"", end=True)
                want[sid] = hashlib.sha256(body).hexdigest()
            for _ in range(1500):
                if ended >= set(want):
                    break
                await asyncio.sleep(0.02)
            for sid, digest in want.items():
                assert bytes(replies.get(sid, b""))[1:].decode() == digest, (sid, replies.get(sid))
                assert replies[sid][0] == 0            # status OK from the Connector
            # DATAGRAMs: UDP through the Connector's real socket to the echo server and back.
            payloads = [os.urandom(n) for n in (1, 100, 1000)]
            for n, p in enumerate(payloads):
                conn.send_datagram(encode_service_datagram("echo", build_udp_packet(
                    bytes([100, 64, 0, 1]), bytes([10, 100, 0, 2]), 5000 + n, 7, p)))
            for _ in range(300):
                if len([d for d in agent.datagrams if d[0] >> 4 == 4]) >= 3:
                    break
                await asyncio.sleep(0.02)
            got = sorted(bytes(parse_udp(d, parse_ip(d)).payload) for d in agent.datagrams if d[0] >> 4 == 4)
            assert got == sorted(payloads)
            await agent.close()
        finally:
            connector.terminate()
            connector.wait(10)
            log.close()
            tcp.close()
            udp.close()

    asyncio.run(main())
    m1 = i1.metrics()
    assert m1['ztna_mesh_streams_total{direction="forwarded"}'] == 3
    assert i2.metrics()['ztna_mesh_streams_total{direction="received"}'] == 3


def test_isolation_holds_across_the_mesh(tmp_path: Path) -> None:
    """On I2 a Connector of `echo` sprays 0x31 replies at every id it can guess: the remote
    Agent of `web` (on I1, forwarded through the mesh) receives none of them."""
    from ztna.wire import encode_from_connector

    pki = tmp_path / "pki"
    init_pki(pki, ["echo", "web"])
    issue(pki, "agent", "agent-web", ["web"], out_prefix=pki / "agent-web")
    issue(pki, "connector", "connector-echo", ["echo"], out_prefix=pki / "connector-echo")
    issue(pki, "member", "member", out_prefix=pki / "member")
    redis = RedisProc(tmp_path / "redis").start()
    i1 = member(pki, redis, tmp_path / "i1.log").start()
    i2 = member(pki, redis, tmp_path / "i2.log").start()

    async def main() -> None:
        web = await Peer(echo=True).connect("127.0.0.1", i2.port, TlsFiles.from_dir(pki, "connector"))
        assert isinstance(await web.register(Role.CONNECTOR, "web"), RegistrationAck)
        evil = await Peer().connect("127.0.0.1", i2.port, TlsFiles.from_dir(pki, "connector-echo"))
        assert isinstance(await evil.register(Role.CONNECTOR, "echo"), RegistrationAck)
        victim = await Peer().connect("127.0.0.1", i1.port, TlsFiles.from_dir(pki, "agent-web"))
        assert isinstance(await victim.register(Role.AGENT, "web"), RegistrationAck)
        await until_placed(i1, "web")
        assert victim.conn is not None and evil.conn is not None
        for n in range(5):          # the victim's traffic makes it a remote Agent on I2
            victim.conn.send_datagram(encode_service_datagram("web", packet(1, 4000 + n, b"mine")))
        for _ in range(200):
            if len([d for d in victim.datagrams if d[0] >> 4 == 4]) >= 5:
                break
            await asyncio.sleep(0.02)
        assert len([d for d in victim.datagrams if d[0] >> 4 == 4]) == 5
        marker = build_udp_packet(bytes([10, 9, 9, 9]), bytes([10, 1, 2, 1]), 9999, 4000, b"EVIL")
        for agent_id in range(1, 200):
            evil.conn.send_datagram(encode_from_connector(agent_id, marker))
        await asyncio.sleep(1.0)
        assert not any(b"EVIL" in d for d in victim.datagrams)
        for p in (victim, evil, web):
            await p.close()

    try:
        asyncio.run(main())
        assert i2.metrics()['ztna_relay_dropped_total{reason="bad_reply"}'] >= 199
        assert i1.metrics().get('ztna_mesh_dropped_total{reason="bad_reply"}', 0) == 0
    finally:
        i1.stop()
        i2.stop()
        redis.kill()


def test_mesh_datagrams_take_native_routes_until_the_decision_changes(
        pki: Path, cluster: tuple[IntermediateProc, IntermediateProc]) -> None:
    """After the first packet Python placed, an Agent's DATAGRAMs cross I1 → I2 → Connector and
    back on native routes (byte-exact, counted natively on both members); when a Connector of
    the service shows up on I1 itself, the route goes and the packets stay on I1."""
    i1, i2 = cluster

    async def main() -> None:
        remote = await Peer(echo=True).connect("127.0.0.1", i2.port, TlsFiles.from_dir(pki, "connector"))
        assert isinstance(await remote.register(Role.CONNECTOR, "echo"), RegistrationAck)
        agent = await Peer().connect("127.0.0.1", i1.port, TlsFiles.from_dir(pki, "agent"))
        assert isinstance(await agent.register(Role.AGENT, "echo"), RegistrationAck)
        await until_placed(i1, "echo")
        assert agent.conn is not None

        def answers() -> list[bytes]:
            return [bytes(parse_udp(d, parse_ip(d)).payload) for d in agent.datagrams if d[0] >> 4 == 4]

        async def exchange(count: int, start: int) -> list[bytes]:
            assert agent.conn is not None
            sent = []
            for n in range(count):
                payload = os.urandom(20 + (n * 37) % 1100)
                sent.append(payload)
                agent.conn.send_datagram(encode_service_datagram("echo", packet(1, 4000 + (start + n) % 50, payload)))
                await asyncio.sleep(0.003)
            for _ in range(400):
                got = set(answers())
                if all(p in got for p in sent):
                    break
                await asyncio.sleep(0.02)
            return sent

        sent = await exchange(1, 0)        # Python places the first one and installs the routes
        sent += await exchange(200, 1)
        assert sorted(answers()) == sorted(sent)
        assert remote.echoed == 201
        m1, m2 = i1.metrics(), i2.metrics()
        for m, directions in ((m1, ("forwarded", "delivered")), (m2, ("received", "replied"))):
            for d in directions:
                assert m[f'ztna_mesh_native_datagrams_total{{direction="{d}"}}'] >= 195, (d, m)
                assert m[f'ztna_mesh_datagrams_total{{direction="{d}"}}'] == 201, (d, m)
        # A second Connector on I2: a per-flow choice there now, so I2's route goes (I1's
        # stays: every Connector of the service is still on I2) and both Connectors get flows.
        second = await Peer(echo=True).connect("127.0.0.1", i2.port, TlsFiles.from_dir(pki, "connector"))
        assert isinstance(await second.register(Role.CONNECTOR, "echo"), RegistrationAck)
        await asyncio.sleep(0.2)
        agent.datagrams.clear()
        sent = await exchange(100, 1000)            # 50 flows (source ports)
        assert sorted(answers()) == sorted(sent)
        assert second.echoed > 0 and remote.echoed > 201 and remote.echoed + second.echoed == 301
        # A Connector of the service on I1: the flows stay here now, the mesh route is gone.
        local = await Peer(echo=True).connect("127.0.0.1", i1.port, TlsFiles.from_dir(pki, "connector"))
        assert isinstance(await local.register(Role.CONNECTOR, "echo"), RegistrationAck)
        await asyncio.sleep(0.2)
        agent.datagrams.clear()
        sent = await exchange(30, 300)
        assert sorted(answers()) == sorted(sent)
        assert local.echoed == 30 and remote.echoed + second.echoed == 301
        assert i1.metrics()['ztna_mesh_datagrams_total{direction="forwarded"}'] == 301
        for p in (agent, local, remote, second):
            await p.close()

    asyncio.run(main())
