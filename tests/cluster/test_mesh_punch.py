"""Hole-punch signaling across the mesh, between real member processes: an Agent attached to
I1 and a Connector attached to I2 (both in this process, on real loopback sockets) get a direct
path from signaling that crosses I1 → I2 and back, and UDP through the service is byte-exact on
it with the mesh carrying none of it. A punch for a service the Agent may not reach is refused
on its own member, as on one Intermediate, and nothing of it reaches the other member."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path

import pytest
from cluster_helpers import IntermediateProc, Peer
from test_mesh import until_placed

from ztna.agent.agent import Agent
from ztna.agent.config import AgentOptions, parse_forward, parse_service
from ztna.certs import init_pki, issue
from ztna.connector.config import load_config
from ztna.connector.service import Connector
from ztna.quic.config import TlsFiles
from ztna.wire import Candidate, PunchRequest, PunchStart, RegistrationAck, Role, encode_control

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web", "echo"])
    issue(d, "agent", "agent-echo", ["echo"], out_prefix=d / "agent-echo")
    issue(d, "member", "member", out_prefix=d / "member")
    return d


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.t.sendto(data, addr)  # type: ignore[attr-defined]


def test_agent_and_connector_on_two_members_go_direct(
        pki: Path, cluster: tuple[IntermediateProc, IntermediateProc], tmp_path: Path) -> None:
    i1, i2 = cluster

    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
        echo_port = echo.get_extra_info("sockname")[1]
        cfg = load_config(None, {
            "intermediate": f"127.0.0.1:{i2.port}", "server_name": "localhost",
            "cert": pki / "connector.pem", "key": pki / "connector.key", "ca": pki / "ca.pem",
            "p2p_port": 0, "p2p_host": "::", "relay_host": "0.0.0.0", "metrics": "off",
        }, [f"web=10.100.0.2;udp:53=127.0.0.1:{echo_port}"])
        conn = Connector(cfg)
        await conn.start()
        agent = Agent(AgentOptions(intermediate=("127.0.0.1", i1.port),
                                   tls=TlsFiles.from_dir(pki, "agent"), server_name="localhost",
                                   services=(parse_service("web=10.100.0.2"),), mode="userspace",
                                   name="p2p", state_dir=tmp_path / "state",
                                   udp_forwards=(parse_forward("127.0.0.1:0=web:53", "-U"),)))
        await agent.start()
        try:
            await agent.wait_ready()
            await until_placed(i1, "web")
            snap = agent.snapshot()
            for _ in range(1000):
                snap = agent.snapshot()
                if snap["services"][0]["path"] == "direct" and snap["warmup_ms"] is not None:
                    break
                await asyncio.sleep(0.02)
            assert snap["services"][0]["path"] == "direct", snap["p2p"]
            assert conn.punch.snapshot()["direct"] == 1
            port = agent.userspace.bound_port("udp", 0)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect(("127.0.0.1", port))
            for n in range(8):
                payload = os.urandom(100 + n * 150)
                await loop.sock_sendall(s, payload)
                data = await asyncio.wait_for(loop.sock_recv(s, 65535), 5)
                assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
            s.close()
            assert agent.snapshot()["p2p"]["services"]["web"]["punch"]["state"] == "nominated"
        finally:
            await agent.stop()
            await conn.stop()
            echo.close()

    asyncio.run(asyncio.wait_for(main(), 120))
    m1, m2 = i1.metrics(), i2.metrics()
    # The session ran on I2 (the Connector's member) and the Agent's result crossed back.
    assert m2["ztna_signaling_sessions_total"] == 1
    assert m2['ztna_signaling_results_total{outcome="direct"}'] >= 1
    assert m1.get("ztna_signaling_sessions_total", 0) == 0
    assert m1['ztna_mesh_signals_total{direction="forwarded"}'] >= 2     # request, result
    assert m1['ztna_mesh_signals_total{direction="delivered"}'] >= 1     # start
    assert m2['ztna_mesh_signals_total{direction="received"}'] == m1['ztna_mesh_signals_total{direction="forwarded"}']
    # The UDP went direct: nothing of it crossed the mesh.
    assert m1.get('ztna_mesh_datagrams_total{direction="forwarded"}', 0) == 0


def test_a_punch_for_a_service_the_agent_may_not_reach_is_refused(
        pki: Path, cluster: tuple[IntermediateProc, IntermediateProc]) -> None:
    """`web` is served on I2 only; an Agent of `echo` on I1 asks to punch to `web`: I1 ignores
    it (counted) and sends nothing to I2, exactly as one Intermediate would; the same Agent's
    request for its own service (no Connector anywhere) gets `no_connector`."""
    i1, i2 = cluster

    async def main() -> None:
        web = await Peer().connect("127.0.0.1", i2.port, TlsFiles.from_dir(pki, "connector"))
        assert isinstance(await web.register(Role.CONNECTOR, "web"), RegistrationAck)
        intruder = await Peer().connect("127.0.0.1", i1.port, TlsFiles.from_dir(pki, "agent-echo"))
        assert isinstance(await intruder.register(Role.AGENT, "echo"), RegistrationAck)
        await until_placed(i1, "web")
        assert intruder.conn is not None
        cands = (Candidate(kind="host", ip="127.0.0.1", port=4999, priority=1, foundation="h1"),)
        intruder.conn.send_control(encode_control(PunchRequest(service="web", candidates=cands)))
        intruder.conn.send_control(encode_control(PunchRequest(service="echo", candidates=cands)))
        await intruder.wait_message(lambda m: getattr(m, "code", None) == "no_connector", 5)
        await asyncio.sleep(0.5)
        assert not any(isinstance(m, PunchStart) for m in intruder.messages)
        for p in (intruder, web):
            await p.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    m1, m2 = i1.metrics(), i2.metrics()
    assert m1['ztna_signaling_ignored_total{reason="not_agent"}'] == 1
    assert m1['ztna_signaling_no_connector_total'] == 1
    assert m1.get('ztna_mesh_signals_total{direction="forwarded"}', 0) == 0
    assert m2.get('ztna_mesh_signals_total{direction="received"}', 0) == 0
    assert m2.get("ztna_signaling_sessions_total", 0) == 0
