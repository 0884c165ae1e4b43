"""Connector end to end on loopback with real sockets: a real Intermediate, the Connector,
an Agent client speaking QUIC, and real UDP/TCP backends (in-process, no root)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ztna.certs import init_pki, issue
from ztna.connector.config import load_config
from ztna.connector.service import Connector
from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.netstack.packets import (
    ACK,
    RST,
    SYN,
    _icmp,
    build_icmp_echo_reply,
    build_tcp_packet,
    build_udp_packet,
    parse_icmp,
    parse_ip,
    parse_tcp,
    parse_udp,
    verify_checksums,
)
from ztna.quic.config import TlsFiles
from ztna.wire import StreamOpen, encode_stream_open
from ztna.worlds.agent_client import AgentClient, tcp_echo, udp_echo

AGENT_IP = ipaddress.ip_address("100.64.0.1").packed
AGENT_IP6 = ipaddress.ip_address("fd00:64::1").packed
WEB = ipaddress.ip_address("10.100.0.2").packed
WEB6 = ipaddress.ip_address("fd00:100::2").packed
DNS = ipaddress.ip_address("10.100.0.3").packed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web", "dns"])
    issue(d, "agent", "agentweb", ["web"])
    return d


class World:
    inter: Intermediate
    conn: Connector
    backends: list[Any]


def run(pki: Path, body: Callable[[World], Awaitable[None]], **extra: Any) -> None:
    async def main() -> None:
        w = World()
        w.inter = Intermediate(IntermediateOptions(
            tls=TlsFiles.from_dir(pki, "intermediate"), listen=[("127.0.0.1", 0)], metrics=None))
        await w.inter.start()
        web_udp, web_udp_port = await udp_echo(b"web:")
        dns_udp, dns_udp_port = await udp_echo(b"dns:")
        web_tcp, web_tcp_port = await tcp_echo(b"W")
        w.backends = [web_udp, dns_udp, web_tcp]
        cfg = load_config(None, {
            "intermediate": f"127.0.0.1:{w.inter.ports[0]}", "server_name": "localhost",
            "cert": pki / "connector.pem", "key": pki / "connector.key", "ca": pki / "ca.pem",
            "p2p_port": 0, "p2p_host": "127.0.0.1", "relay_host": "0.0.0.0",
            "metrics": extra.pop("metrics", "off"), **extra,
        }, [f"web=10.100.0.2,fd00:100::2;tcp:80=127.0.0.1:{web_tcp_port};udp:53=127.0.0.1:{web_udp_port}",
            f"dns=10.100.0.3;udp:53=127.0.0.1:{dns_udp_port};udp:54=127.0.0.1:9;icmp=off"])
        w.conn = Connector(cfg)
        await w.conn.start()
        try:
            for _ in range(200):
                if w.conn.relay is not None and w.conn.relay.all_registered:
                    break
                await asyncio.sleep(0.02)
            assert w.conn.relay is not None and w.conn.relay.all_registered
            await body(w)
        finally:
            await w.conn.stop()
            await w.inter.stop()
            web_udp.close()
            dns_udp.close()
            web_tcp.close()

    asyncio.run(asyncio.wait_for(main(), 60))


async def agent(w: World, pki: Path, services: list[str] = ["web", "dns"]) -> AgentClient:  # noqa: B006
    a = await AgentClient().connect(("127.0.0.1", w.inter.ports[0]), pki, services)
    await a.wait_registered(services)
    return a


def test_udp_reply_source_is_virtual_address_and_services_reach_own_backends(pki: Path) -> None:
    async def body(w: World) -> None:
        a = await agent(w, pki)
        a.send("web", build_udp_packet(AGENT_IP, WEB, 40000, 53, b"hello"))
        pkt = await a.recv()
        ip = parse_ip(pkt)
        udp = parse_udp(pkt, ip)
        assert (ip.src, ip.dst, udp.sport, udp.dport) == (WEB, AGENT_IP, 53, 40000)
        assert bytes(udp.payload) == b"web:hello" and verify_checksums(pkt)
        a.send("dns", build_udp_packet(AGENT_IP, DNS, 40001, 53, b"q"))
        pkt = await a.recv()
        ip = parse_ip(pkt)
        assert ip.src == DNS and bytes(parse_udp(pkt, ip).payload) == b"dns:q"
        # IPv6 virtual address of the same service
        a.send("web", build_udp_packet(AGENT_IP6, WEB6, 40002, 53, b"six"))
        pkt = await a.recv()
        ip = parse_ip(pkt)
        assert (ip.version, ip.src) == (6, WEB6) and bytes(parse_udp(pkt, ip).payload) == b"web:six"
        assert len(w.conn.udp) == 3
        a.close()
    run(pki, body)


def test_established_udp_flows_move_natively_and_stay_per_agent(pki: Path) -> None:
    """After Python created a flow, its packets go natively both ways (DATAGRAM → backend
    socket, backend → DATAGRAM from the virtual address); two Agents with the same inner
    5-tuple keep their own flows, and the counters reach the stats."""
    async def body(w: World) -> None:
        a = await agent(w, pki)
        b = await agent(w, pki)
        for n in range(40):
            for who, client in ((b"a", a), (b"b", b)):
                payload = who + b"-%d-" % n + bytes(range(256)) * 4
                client.send("web", build_udp_packet(AGENT_IP, WEB, 40000, 53, payload))
                pkt = await client.recv()
                ip = parse_ip(pkt)
                udp = parse_udp(pkt, ip)
                assert (ip.src, ip.dst, udp.sport, udp.dport) == (WEB, AGENT_IP, 53, 40000)
                assert bytes(udp.payload) == b"web:" + payload and verify_checksums(pkt)
        assert len(w.conn.udp) == 2
        native = w.conn.udp.native.stats()
        # Each flow's first packet made the flow in Python; every later one went natively.
        assert native["to_backend"] == 2 * 39 and native["to_agent"] >= 2 * 39, native
        assert native["panics"] == 0
        # On a threaded relay endpoint its thread read the backends' replies (the loop did
        # not watch those sockets); on the asyncio driver the loop read every one.
        threaded = w.conn.relay_endpoint is not None and w.conn.relay_endpoint.threaded
        assert (native["thread_bursts"] >= 2 * 39) == threaded, (threaded, native)
        w.conn.udp.sync_stats()
        assert w.conn.stats.udp_to_backend == 80 and w.conn.stats.udp_to_agent == 80
        a.close()
        b.close()
    run(pki, body)


def test_udp_refused_backend_and_unoffered_port_give_port_unreachable(pki: Path) -> None:
    async def body(w: World) -> None:
        a = await agent(w, pki)
        for port in (54, 55):     # 54 → backend port 9 refuses; 55 is not offered at all
            original = build_udp_packet(AGENT_IP, DNS, 40000, port, b"x")
            a.send("dns", original)
            pkt = await a.recv()
            ip = parse_ip(pkt)
            msg = parse_icmp(pkt, ip)
            assert (ip.src, ip.dst, msg.type, msg.code) == (DNS, AGENT_IP, 3, 3)
            assert bytes(msg.rest[4:]) == original
        a.close()
    run(pki, body)


def test_ping_virtual_ip_only(pki: Path) -> None:
    async def body(w: World) -> None:
        a = await agent(w, pki)
        echo = _icmp(AGENT_IP, WEB, 8, 0, b"\x12\x34\x00\x01payload")
        a.send("web", echo)
        assert await a.recv() == build_icmp_echo_reply(echo)
        echo6 = _icmp(AGENT_IP6, WEB6, 128, 0, b"\x12\x34\x00\x02p6")
        a.send("web", echo6)
        assert await a.recv() == build_icmp_echo_reply(echo6)
        # not a virtual IP of the service; and a service with icmp=off
        a.send("web", _icmp(AGENT_IP, ipaddress.ip_address("10.100.0.9").packed, 8, 0, b"\0\1\0\1x"))
        a.send("web", _icmp(AGENT_IP, DNS, 8, 0, b"\0\1\0\1x"))
        a.send("dns", _icmp(AGENT_IP, DNS, 8, 0, b"\0\1\0\1x"))
        with pytest.raises(asyncio.TimeoutError):
            await a.recv(timeout=0.5)
        assert w.conn.stats.not_virtual_ip == 2 and w.conn.stats.icmp_dropped == 1
        a.close()
    run(pki, body)


def test_tcp_handshake_data_fin_and_rst_cases(pki: Path) -> None:
    async def body(w: World) -> None:
        a = await agent(w, pki)
        # segment for an unknown flow → RST
        a.send("web", build_tcp_packet(AGENT_IP, WEB, 41000, 80, seq=5, ack=77, flags=ACK, window=1000))
        pkt = await a.recv()
        seg = parse_tcp(pkt, parse_ip(pkt))
        assert seg.flags & RST and seg.seq == 77
        # SYN to a port the service does not expose → RST|ACK
        a.send("web", build_tcp_packet(AGENT_IP, WEB, 41001, 81, seq=1000, ack=0, flags=SYN, window=1000, mss=1400))
        pkt = await a.recv()
        seg = parse_tcp(pkt, parse_ip(pkt))
        assert seg.flags == RST | ACK and seg.ack == 1001
        # a real handshake: SYN-ACK with the clamped MSS, then data both ways
        a.send("web", build_tcp_packet(AGENT_IP, WEB, 41002, 80, seq=1000, ack=0, flags=SYN, window=65535, mss=1460))
        pkt = await a.recv()
        ip = parse_ip(pkt)
        seg = parse_tcp(pkt, ip)
        assert seg.flags == SYN | ACK and seg.ack == 1001 and ip.src == WEB
        relay_conn = w.conn.relay.conn
        assert seg.mss == relay_conn.max_datagram_payload() - 6 - 20 - 20 - 12
        isn = seg.seq
        a.send("web", build_tcp_packet(AGENT_IP, WEB, 41002, 80, seq=1001, ack=isn + 1, flags=ACK, window=65535,
                                       payload=b"ping"))
        got = b""
        while len(got) < 5:
            pkt = await a.recv()
            seg = parse_tcp(pkt, parse_ip(pkt))
            if seg.payload:
                assert seg.seq == isn + 1 + len(got)
                got += bytes(seg.payload)
        assert got == b"Wping"
        # FIN from the Agent → backend sees EOF → its FIN comes back
        a.send("web", build_tcp_packet(AGENT_IP, WEB, 41002, 80, seq=1005, ack=isn + 6, flags=ACK | 0x01,
                                       window=65535))
        for _ in range(5):
            pkt = await a.recv()
            seg = parse_tcp(pkt, parse_ip(pkt))
            if seg.flags & 0x01:
                break
        assert seg.flags & 0x01 and seg.ack == 1006
        a.close()
    run(pki, body)


def test_tcp_stream_through_intermediate_splicer(pki: Path) -> None:
    async def body(w: World) -> None:
        a = await agent(w, pki)
        conn = a.conn
        sid = conn.open_stream()
        conn.send_stream(sid, encode_stream_open(StreamOpen("web", "10.100.0.2", 80)) + b"abc")
        conn.send_stream(sid, b"def" * 100000, end=True)
        await asyncio.wait_for(a.stream_fin.setdefault(sid, asyncio.Event()).wait(), 10)
        assert bytes(a.streams[sid]) == b"\x00" + b"W" + b"abc" + b"def" * 100000
        # refused: port not offered, and a service the agent is not registered for
        s2 = conn.open_stream()
        conn.send_stream(s2, encode_stream_open(StreamOpen("web", "10.100.0.2", 81)), end=True)
        await asyncio.wait_for(a.stream_fin.setdefault(s2, asyncio.Event()).wait(), 5)
        assert bytes(a.streams[s2]) == b"\x04"
        a.close()
    run(pki, body)


def test_direct_p2p_datagrams_streams_and_authorization(pki: Path) -> None:
    async def body(w: World) -> None:
        port = w.conn.p2p.local_port
        a = await AgentClient().connect(("127.0.0.1", port), pki, [], cert="agentweb",
                                     server_name="connector.web.ztna", instance=7)
        a.send("web", build_udp_packet(AGENT_IP, WEB, 40000, 53, b"direct"))
        pkt = await a.recv()
        assert pkt[0] >> 4 == 4 and bytes(parse_udp(pkt, parse_ip(pkt)).payload) == b"web:direct"
        # this agent's certificate does not allow "dns"
        a.send("dns", build_udp_packet(AGENT_IP, DNS, 40000, 53, b"nope"))
        with pytest.raises(asyncio.TimeoutError):
            await a.recv(timeout=0.5)
        assert w.conn.stats.not_authorized == 1
        sid = a.conn.open_stream()
        a.conn.send_stream(sid, encode_stream_open(StreamOpen("web", "10.100.0.2", 80)) + b"x", end=True)
        await asyncio.wait_for(a.stream_fin.setdefault(sid, asyncio.Event()).wait(), 5)
        assert bytes(a.streams[sid]) == b"\x00Wx"
        s2 = a.conn.open_stream()
        a.conn.send_stream(s2, encode_stream_open(StreamOpen("dns", "10.100.0.3", 80)), end=True)
        await asyncio.wait_for(a.stream_fin.setdefault(s2, asyncio.Event()).wait(), 5)
        assert bytes(a.streams[s2]) == b"\x03"
        # the P2P socket learnt its own public address from the Intermediate
        for _ in range(100):
            if w.conn.p2p.public_address is not None:
                break
            await asyncio.sleep(0.02)
        assert w.conn.p2p.public_address is not None and w.conn.p2p.public_address.port == port
        a.close()
    run(pki, body)


def test_tcp_in_datagrams_and_udp_flows_get_audit_lines(pki: Path, tmp_path: Path) -> None:
    from ztna.audit import FlowRecord

    audit = tmp_path / "audit.jsonl"

    async def body(w: World) -> None:
        a = await agent(w, pki)
        a.send("web", build_tcp_packet(AGENT_IP, WEB, 42002, 80, seq=1000, ack=0, flags=SYN, window=65535, mss=1460))
        pkt = await a.recv()
        isn = parse_tcp(pkt, parse_ip(pkt)).seq
        a.send("web", build_tcp_packet(AGENT_IP, WEB, 42002, 80, seq=1001, ack=isn + 1, flags=ACK, window=65535,
                                       payload=b"hello"))
        got = b""
        while len(got) < 6:
            pkt = await a.recv()
            seg = parse_tcp(pkt, parse_ip(pkt))
            got += bytes(seg.payload)
        assert got == b"Whello"
        a.send("web", build_udp_packet(AGENT_IP, WEB, 5353, 53, b"q" * 10))
        assert parse_udp(pkt := await a.recv(), parse_ip(pkt)).payload == b"web:" + b"q" * 10
        a.close()
    run(pki, body, audit_log=audit)     # the Connector's stop ends both flows
    lines = [FlowRecord.model_validate_json(line) for line in audit.read_text().splitlines()]
    by_proto = {r.protocol: r for r in lines if r.event == "end"}
    tcp, udp = by_proto["tcp"], by_proto["udp"]
    assert (tcp.service, tcp.dst_port, tcp.path, tcp.bytes_to_service, tcp.bytes_from_service) == ("web", 80, "relay", 5, 6)
    assert tcp.setup.backend_connect_ms is not None and tcp.close_reason in ("shutdown", "agent gone"), tcp
    assert (udp.service, udp.dst_port, udp.bytes_to_service, udp.bytes_from_service) == ("web", 53, 10, 14)
    assert tcp.agent_id == udp.agent_id is not None
