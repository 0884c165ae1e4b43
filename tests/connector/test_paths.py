"""Reply paths and flow keys: one flow per (agent id, inner 5-tuple) across relay and direct.

Fake QUIC connections (they record the DATAGRAMs queued on them); a real UDP backend socket
on loopback, so the UDP flow test checks the bytes the backend sees and the packets that go
back, and on which connection.
"""

from __future__ import annotations

import asyncio
import socket

from ztna.connector.config import ServiceConfig
from ztna.connector.paths import AgentPaths, ReplyPath
from ztna.connector.service import ConnectorStats, ServiceState
from ztna.connector.udp_flows import UdpFlows
from ztna.identity import stable_peer_id
from ztna.netstack.packets import build_udp_packet, parse_ip, parse_udp

AGENT_IP, VIP = bytes([10, 200, 0, 1]), bytes([10, 100, 0, 2])


class FakeConn:
    def __init__(self, label: str, payload: int = 1200) -> None:
        self.label = label
        self.payload = payload
        self.sent: list[bytes] = []
        self.closed = False

    def max_datagram_payload(self) -> int:
        return self.payload

    def datagram_budget(self) -> int:
        return 64

    def send_datagram(self, data: bytes) -> bool:
        self.sent.append(bytes(data))
        return True


def test_stable_peer_id_matches_the_intermediates_formula() -> None:
    import hashlib

    fp, inst = "ab" * 32, 0x0123456789ABCDEF
    digest = hashlib.blake2b(fp.encode() + inst.to_bytes(8, "big"), digest_size=8).digest()
    assert stable_peer_id(fp, inst) == int.from_bytes(digest[:4], "big")
    assert stable_peer_id(fp, inst) != stable_peer_id(fp, inst + 1)


def test_reply_path_framing_and_mss() -> None:
    relay = ReplyPath(FakeConn("relay"), 0x01020304)
    direct = ReplyPath(FakeConn("direct"), 0x01020304, direct=True)
    assert relay.send(b"\x45pkt") and relay.conn.sent == [b"\x31\x01\x01\x02\x03\x04\x45pkt"]
    assert direct.send(b"\x45pkt") and direct.conn.sent == [b"\x45pkt"]
    assert relay.max_packet() == 1194 and direct.max_packet() == 1200
    # a flow that starts direct may move to the relay: same MSS on both
    assert direct.tcp_mss(4) == relay.tcp_mss(4) == 1200 - 6 - 20 - 20 - 12


def test_alternate_path_of_the_same_agent() -> None:
    agents = AgentPaths()
    relay_conn = FakeConn("relay")
    relay = agents.relay_path(relay_conn, 7)
    assert agents.relay_path(relay_conn, 7) is relay
    d1 = ReplyPath(FakeConn("d1"), 7, direct=True)
    other = ReplyPath(FakeConn("d2"), 8, direct=True)
    agents.add_direct(d1)
    agents.add_direct(other)
    # relay gone (AgentGone / relay down): the direct connection takes over
    relay.alive = False
    agents.remove(relay)
    assert agents.alternate(relay, None) is d1
    # direct gone: back to a relay path on the live relay connection (made on demand)
    d1.alive = False
    agents.remove(d1)
    alt = agents.alternate(d1, relay_conn)
    assert alt is not None and alt.conn is relay_conn and alt.agent_id == 7 and alt.alive
    assert agents.alternate(d1, None) is None      # no relay either: the flows end
    assert agents.direct == {8: [other]}


def test_udp_flow_survives_a_path_switch() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        backend.bind(("127.0.0.1", 0))
        backend.setblocking(False)
        port = backend.getsockname()[1]
        svc = ServiceState(ServiceConfig(id="web", virtual_ips=["10.100.0.2"],
                                         udp={53: f"127.0.0.1:{port}"}))
        stats = ConnectorStats()
        flows = UdpFlows(loop, stats, total_limit=10, per_service_limit=10, idle_timeout=30)
        relay = ReplyPath(FakeConn("relay"), 9)
        direct = ReplyPath(FakeConn("direct"), 9, direct=True)

        def inject(path: ReplyPath, payload: bytes) -> None:
            pkt = build_udp_packet(AGENT_IP, VIP, 40000, 53, payload)
            flows.on_packet(path, svc, parse_ip(pkt), memoryview(pkt), loop.time())

        inject(relay, b"one")
        d1, src1 = await loop.sock_recvfrom(backend, 2048)
        inject(direct, b"two")                 # same 5-tuple, now on the direct path
        d2, src2 = await loop.sock_recvfrom(backend, 2048)
        assert (d1, d2) == (b"one", b"two") and src1 == src2     # one flow, one socket
        assert len(flows) == 1 and relay.flows == 0 and direct.flows == 1
        await loop.sock_sendto(backend, b"answer", src2)
        for _ in range(100):
            if direct.conn.sent:
                break
            await asyncio.sleep(0.01)
        (reply,) = direct.conn.sent                # on the path of the latest packet
        ip = parse_ip(reply)
        assert ip.src == VIP and ip.dst == AGENT_IP
        assert bytes(parse_udp(reply, ip).payload) == b"answer"
        assert [s for s in relay.conn.sent] == []
        # the direct path dies: the flow moves back to the relay instead of ending
        flows.drop_path(direct, relay)
        await loop.sock_sendto(backend, b"again", src2)
        for _ in range(100):
            if relay.conn.sent:
                break
            await asyncio.sleep(0.01)
        (reply,) = relay.conn.sent
        assert reply[:6] == b"\x31\x01\x00\x00\x00\x09"
        assert bytes(parse_udp(reply[6:], parse_ip(reply[6:])).payload) == b"again"
        flows.close_all()
        backend.close()

    asyncio.run(body())


def test_agent_ids_of_two_relay_links_are_apart() -> None:
    """Attached to two Intermediates, one agent id on both links is two Agents: two relay
    paths, and a direct connection joins the link its id is relayed on (only one: that)."""
    agents = AgentPaths()
    agents.links = 2
    c0, c1 = FakeConn("relay 0"), FakeConn("relay 1")
    p0, p1 = agents.relay_path(c0, 7, 0), agents.relay_path(c1, 7, 1)
    assert p0 is not p1 and p0.key != p1.key and (p0.link, p1.link) == (0, 1)
    assert agents.relay_path(c1, 7, 1) is p1 and agents.relay_path(c0, 7) is p0
    assert (p0.key, p1.key) == (7, (1 << 32) | 7)          # link 0 keeps the bare id
    assert p1.send(b"\x45pkt") and c1.sent == [b"\x31\x01\x00\x00\x00\x07\x45pkt"] and c0.sent == []
    only_on_1 = agents.relay_path(c1, 8, 1)
    direct = ReplyPath(FakeConn("d8"), 8, direct=True)
    agents.add_direct(direct)
    assert direct.link == 1 and direct.key == only_on_1.key
    only_on_1.alive = False
    agents.remove(only_on_1)
    assert agents.alternate(only_on_1, c1) is direct
    both = ReplyPath(FakeConn("d7"), 7, direct=True)
    agents.add_direct(both)
    assert both.link == 0                                 # on both links: the first


def test_udp_flows_with_one_agent_id_on_two_links_stay_apart() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        backend.bind(("127.0.0.1", 0))
        backend.setblocking(False)
        port = backend.getsockname()[1]
        svc = ServiceState(ServiceConfig(id="web", virtual_ips=["10.100.0.2"],
                                         udp={53: f"127.0.0.1:{port}"}))
        flows = UdpFlows(loop, ConnectorStats(), total_limit=10, per_service_limit=10, idle_timeout=30)
        paths = [ReplyPath(FakeConn(f"relay {n}"), 9, link=n) for n in (0, 1)]
        sources = []
        for n, path in enumerate(paths):
            pkt = build_udp_packet(AGENT_IP, VIP, 40000, 53, b"from link %d" % n)
            flows.on_packet(path, svc, parse_ip(pkt), memoryview(pkt), loop.time())
            data, src = await loop.sock_recvfrom(backend, 2048)
            assert data == b"from link %d" % n
            sources.append(src)
        assert len(flows) == 2 and sources[0] != sources[1]      # a socket each
        for n, src in enumerate(sources):
            await loop.sock_sendto(backend, b"to link %d" % n, src)
        for _ in range(100):
            if all(p.conn.sent for p in paths):
                break
            await asyncio.sleep(0.01)
        for n, path in enumerate(paths):
            (reply,) = path.conn.sent
            assert bytes(parse_udp(reply[6:], parse_ip(reply[6:])).payload) == b"to link %d" % n
        flows.close_all()
        backend.close()

    asyncio.run(body())
