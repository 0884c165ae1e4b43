"""End to end on loopback (no NAT): Intermediate + Connector + Agent in one loop; the
Agent punches, goes direct, UDP through the service is byte-exact both ways on the direct
path, and the status shows it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path

import pytest

from ztna.agent.agent import Agent
from ztna.agent.config import AgentOptions, parse_forward, parse_service
from ztna.certs import init_pki
from ztna.connector.config import load_config
from ztna.connector.service import Connector
from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.quic.config import TlsFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web"])
    return d


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.t.sendto(data, addr)  # type: ignore[attr-defined]


async def _case(pki: Path, tmp: Path) -> None:
    loop = asyncio.get_running_loop()
    inter = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(pki, "intermediate"),
                                             listen=[("127.0.0.1", 0)], metrics=None))
    await inter.start()
    echo, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    echo_port = echo.get_extra_info("sockname")[1]
    cfg = load_config(None, {
        "intermediate": f"127.0.0.1:{inter.ports[0]}", "server_name": "localhost",
        "cert": pki / "connector.pem", "key": pki / "connector.key", "ca": pki / "ca.pem",
        "p2p_port": 0, "p2p_host": "::", "relay_host": "0.0.0.0", "metrics": "off",
    }, [f"web=10.100.0.2;udp:53=127.0.0.1:{echo_port}"])
    conn = Connector(cfg)
    await conn.start()
    agent = Agent(AgentOptions(intermediate=("127.0.0.1", inter.ports[0]),
                               tls=TlsFiles.from_dir(pki, "agent"), server_name="localhost",
                               services=(parse_service("web=10.100.0.2"),), mode="userspace",
                               name="p2p", state_dir=tmp / "state",
                               udp_forwards=(parse_forward("127.0.0.1:0=web:53", "-U"),)))
    await agent.start()
    try:
        await agent.wait_ready()
        for _ in range(250):
            snap = agent.snapshot()
            if snap["services"][0]["path"] == "direct" and snap["warmup_ms"] is not None:
                break
            await asyncio.sleep(0.02)
        assert snap["services"][0]["path"] == "direct", snap["p2p"]
        assert snap["warmup_ms"] > 0
        before = conn.punch.snapshot()
        assert before["direct"] == 1
        port = agent.userspace.bound_port("udp", 0)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(("127.0.0.1", port))
        for _ in range(5):
            payload = os.urandom(900)
            await loop.sock_sendall(s, payload)
            data = await asyncio.wait_for(loop.sock_recv(s, 65535), 5)
            assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
        s.close()
        p2p = agent.snapshot()["p2p"]["services"]["web"]
        assert p2p["path"] == "direct" and p2p["punch"]["state"] == "nominated"
        # The packets really took the direct connection: the relay carried none of them.
        assert inter.stats.relayed_datagrams == 0
    finally:
        await agent.stop()
        await conn.stop()
        await inter.stop()
        echo.close()


def test_loopback_goes_direct(pki: Path, tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_case(pki, tmp_path), 60))
