"""The relay's native fast path: an in-process Intermediate installs routes (agent → sole
Connector, Connector → that agent id) from the registry, and the native core forwards those
DATAGRAMs without Python. Proven by counters: the native `relay_forwarded` grows while the
Python relay's `relayed_datagrams` does not; whatever has no route still goes through Python."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from intermediate_helpers import Peer

from ztna.certs import init_pki, issue
from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.netstack.packets import build_udp_packet, parse_ip, parse_udp
from ztna.quic.config import TlsFiles
from ztna.wire import RegistrationAck, Role, encode_from_connector, encode_service_datagram

pytestmark = pytest.mark.timeout(60)

AGENT_IP = bytes([100, 64, 0, 7])
SERVICE_IP = bytes([10, 1, 2, 3])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["echo"])
    issue(d, "connector", "connector-2", ["echo"])
    issue(d, "agent", "agent-2", ["echo"])
    return d


def tls(pki: Path, name: str) -> TlsFiles:
    return TlsFiles.from_dir(pki, name)


def native_stats(inter: Intermediate) -> dict[str, int]:
    totals: dict[str, int] = {}
    for ep in inter.endpoints:
        for k, v in ep.native.stats().items():
            totals[k] = totals.get(k, 0) + v
    return totals


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def packet(payload: bytes, sport: int = 40000) -> bytes:
    return build_udp_packet(AGENT_IP, SERVICE_IP, sport, 9999, payload)


def ip_datagrams(peer: Peer) -> list[bytes]:
    """The bare IP packets a peer got (the Intermediate's QAD DATAGRAM 0x01 left out)."""
    return [d for d in peer.datagrams if d and (0x45 <= d[0] <= 0x4F or 0x60 <= d[0] <= 0x6F)]


def echoed_payloads(peer: Peer) -> list[bytes]:
    out = []
    for data in ip_datagrams(peer):
        ip = parse_ip(data)
        udp = parse_udp(data, ip)
        assert ip.src == SERVICE_IP and ip.dst == AGENT_IP and udp.sport == 9999
        out.append(bytes(udp.payload))
    return out


async def with_intermediate(pki: Path, body: Callable[[Intermediate], Awaitable[None]],
                            listen: list[tuple[str, int]] | None = None) -> None:
    inter = Intermediate(IntermediateOptions(tls=tls(pki, "intermediate"),
                                             listen=listen or [("127.0.0.1", 0)], metrics=None))
    await inter.start()
    try:
        await body(inter)
    finally:
        await inter.stop()


async def peers(inter: Intermediate, pki: Path, spec: list[tuple[str, Role, bool]],
                port: int | None = None, host: str = "127.0.0.1") -> list[Peer]:
    out = []
    for ident, role, echo in spec:
        p = await Peer(echo=echo).connect(host, port or inter.ports[0], tls(pki, ident))
        assert isinstance(await p.register(role, "echo"), RegistrationAck)
        out.append(p)
    return out


def run(coro: Any) -> None:
    asyncio.run(coro)


@pytest.mark.parametrize("thread", ["1", "0"], ids=["driver-thread", "asyncio-driver"])
def test_echo_is_byte_exact_and_carried_natively(pki: Path, thread: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZTNA_ENDPOINT_THREAD", thread)

    async def body(inter: Intermediate) -> None:
        # The Intermediate's endpoints run on a native thread unless switched off.
        assert all(ep.threaded == (thread == "1") for ep in inter.endpoints)
        connector, agent = await peers(inter, pki, [("connector", Role.CONNECTOR, True),
                                                    ("agent", Role.AGENT, False)])
        assert native_stats(inter)["relay_routes"] == 2  # the agent route and its reply route
        sent = [os.urandom(n) for n in (1, 100, 700, 1100)] * 5
        assert agent.conn is not None
        for payload in sent:
            assert agent.conn.send_datagram(encode_service_datagram("echo", packet(payload)))
        await until(lambda: len(ip_datagrams(agent)) == len(sent))
        assert sorted(echoed_payloads(agent)) == sorted(sent)
        assert connector.echoed == len(sent)
        stats = native_stats(inter)
        assert stats["relay_forwarded"] == 2 * len(sent)
        # Both ways were native: Python's relay saw none of these DATAGRAMs.
        assert inter.stats.relayed_datagrams == 0
        assert stats["relay_dropped_oversize"] == stats["relay_dropped_no_target"] == 0
        if thread == "1":
            # The thread carried them. Not one wake-up per datagram: a wake-up takes every
            # datagram queued by then, so on a busy machine several share one.
            assert sum(ep.native.thread_wakeups() for ep in inter.endpoints) >= 1
        for p in (agent, connector):
            await p.close()
    run(with_intermediate(pki, body))


def test_two_agents_never_see_each_others_echoes(pki: Path) -> None:
    async def body(inter: Intermediate) -> None:
        connector, a, b = await peers(inter, pki, [("connector", Role.CONNECTOR, True),
                                                   ("agent", Role.AGENT, False),
                                                   ("agent-2", Role.AGENT, False)])
        assert a.conn is not None and b.conn is not None and connector.conn is not None
        for i in range(20):
            a.conn.send_datagram(encode_service_datagram("echo", packet(b"A%d" % i)))
            b.conn.send_datagram(encode_service_datagram("echo", packet(b"B%d" % i)))
        await until(lambda: len(ip_datagrams(a)) == 20 and len(ip_datagrams(b)) == 20)
        assert sorted(echoed_payloads(a)) == sorted(b"A%d" % i for i in range(20))
        assert sorted(echoed_payloads(b)) == sorted(b"B%d" % i for i in range(20))
        assert native_stats(inter)["relay_forwarded"] == 80
        assert inter.stats.relayed_datagrams == 0
        # What no route covers still meets Python's checks: a reply for an agent id nobody
        # has, an Agent sending a Connector's reply, a Connector sending an Agent's 0x2F.
        connector.conn.send_datagram(encode_from_connector(0xFFFF_FFF0, packet(b"nobody")))
        agent_b_id = next(pid for pid, c in inter.conns.items() if c.identity and c.identity.common_name == "agent-2")
        a.conn.send_datagram(encode_from_connector(agent_b_id, packet(b"forged")))
        connector.conn.send_datagram(encode_service_datagram("echo", packet(b"not an agent")))
        # (a 0x2F from a non-agent early in its connection is held for a registration first)
        await until(lambda: inter.stats.dropped_bad_reply == 2
                    and inter.stats.dropped_unregistered + inter.stats.held_until_registered == 1)
        await asyncio.sleep(0.1)
        assert len(ip_datagrams(a)) == 20 and len(ip_datagrams(b)) == 20
        assert native_stats(inter)["relay_forwarded"] == 80
        for p in (a, b, connector):
            await p.close()
    run(with_intermediate(pki, body))


def test_connector_gone_removes_the_routes(pki: Path) -> None:
    async def body(inter: Intermediate) -> None:
        connector, agent = await peers(inter, pki, [("connector", Role.CONNECTOR, True),
                                                    ("agent", Role.AGENT, False)])
        assert agent.conn is not None
        agent.conn.send_datagram(encode_service_datagram("echo", packet(b"before")))
        await until(lambda: len(ip_datagrams(agent)) == 1)
        assert native_stats(inter)["relay_forwarded"] == 2
        await connector.close()
        await until(lambda: len(inter.conns) == 1)
        assert native_stats(inter)["relay_routes"] == 0
        for _ in range(5):
            agent.conn.send_datagram(encode_service_datagram("echo", packet(b"after")))
        await until(lambda: inter.stats.dropped_no_connector == 5)
        stats = native_stats(inter)
        assert stats["relay_forwarded"] == 2 and stats["relay_dropped_no_target"] == 0
        # A new Connector gets the route back.
        (again,) = await peers(inter, pki, [("connector", Role.CONNECTOR, True)])
        assert native_stats(inter)["relay_routes"] == 2
        agent.conn.send_datagram(encode_service_datagram("echo", packet(b"again")))
        await until(lambda: len(ip_datagrams(agent)) == 2)
        assert native_stats(inter)["relay_forwarded"] == 4
        for p in (agent, again):
            await p.close()
    run(with_intermediate(pki, body))


def test_two_connectors_relay_through_python(pki: Path) -> None:
    async def body(inter: Intermediate) -> None:
        c1, agent = await peers(inter, pki, [("connector", Role.CONNECTOR, True),
                                             ("agent", Role.AGENT, False)])
        assert native_stats(inter)["relay_routes"] == 2
        (c2,) = await peers(inter, pki, [("connector-2", Role.CONNECTOR, True)])
        # A per-flow choice to make now: no native route any more.
        assert native_stats(inter)["relay_routes"] == 0
        assert agent.conn is not None
        for sport in range(40000, 40032):
            agent.conn.send_datagram(encode_service_datagram("echo", packet(b"flow %d" % sport, sport)))
        await until(lambda: len(ip_datagrams(agent)) == 32)
        assert sorted(echoed_payloads(agent)) == sorted(b"flow %d" % s for s in range(40000, 40032))
        assert c1.echoed > 0 and c2.echoed > 0 and c1.echoed + c2.echoed == 32
        assert inter.stats.relayed_datagrams == 64
        assert native_stats(inter)["relay_forwarded"] == 0
        # Back to one Connector: native again.
        await c2.close()
        await until(lambda: native_stats(inter)["relay_routes"] == 2)
        agent.conn.send_datagram(encode_service_datagram("echo", packet(b"one again")))
        await until(lambda: len(ip_datagrams(agent)) == 33)
        assert native_stats(inter)["relay_forwarded"] == 2
        for p in (agent, c1):
            await p.close()
    run(with_intermediate(pki, body))


def test_cross_endpoint_stays_in_python(pki: Path) -> None:
    async def body(inter: Intermediate) -> None:
        v4, v6 = inter.ports
        (connector,) = await peers(inter, pki, [("connector", Role.CONNECTOR, True)], port=v4)
        (agent,) = await peers(inter, pki, [("agent", Role.AGENT, False)], port=v6, host="::1")
        assert native_stats(inter)["relay_routes"] == 0
        assert agent.conn is not None
        agent.conn.send_datagram(encode_service_datagram("echo", packet(b"across")))
        await until(lambda: len(ip_datagrams(agent)) == 1)
        assert inter.stats.relayed_datagrams == 2 and native_stats(inter)["relay_forwarded"] == 0
        for p in (agent, connector):
            await p.close()
    run(with_intermediate(pki, body, listen=[("127.0.0.1", 0), ("::1", 0)]))


def test_oversize_is_dropped_natively_and_counted(pki: Path) -> None:
    async def body(inter: Intermediate) -> None:
        connector, agent = await peers(inter, pki, [("connector", Role.CONNECTOR, True),
                                                    ("agent", Role.AGENT, False)])
        assert agent.conn is not None
        to_connector = next(c for c in inter.conns.values()
                            if c.identity and c.identity.common_name == "connector")
        # 0x30 is 5 bytes longer than the 0x2F it comes from: an Agent's largest DATAGRAM
        # can be too large for the next hop.
        limit = agent.conn.max_datagram_payload()
        overhead = len(encode_service_datagram("echo", packet(b"")))
        big = encode_service_datagram("echo", packet(b"x" * (limit - overhead)))
        assert len(big) == limit and len(big) + 5 > to_connector.max_datagram_payload()
        assert agent.conn.send_datagram(big)
        await until(lambda: native_stats(inter)["relay_dropped_oversize"] == 1)
        assert connector.echoed == 0 and inter.stats.dropped_oversize == 0
        assert native_stats(inter)["relay_forwarded"] == 0
        for p in (agent, connector):
            await p.close()
    run(with_intermediate(pki, body))
