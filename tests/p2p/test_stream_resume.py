"""Resumable TCP streams on loopback (no root): a TCP connection through a userspace `-L`
forward rides a QUIC stream on the direct P2P connection; mid-transfer the direct path goes
silent both ways (the Connector's P2P socket neither reads nor sends), the Agent falls back
to the relay and the stream resumes there (`StreamResume` through the real Intermediate).
The echoed bytes must be exact in both directions."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from ztna.agent.agent import Agent
from ztna.agent.config import AgentOptions, parse_forward, parse_service
from ztna.certs import init_pki
from ztna.connector.config import load_config
from ztna.connector.service import Connector
from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.quic.config import TlsFiles

SIZE = 16 * 1024 * 1024
CUT_AT = 256 * 1024     # loopback socket buffers hold MBs: cut early so QUIC still has work


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web"])
    return d


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


async def _case(pki: Path, tmp: Path) -> None:
    inter = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(pki, "intermediate"),
                                             listen=[("127.0.0.1", 0)], metrics=None))
    await inter.start()
    backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
    bport = backend.sockets[0].getsockname()[1]
    cfg = load_config(None, {
        "intermediate": f"127.0.0.1:{inter.ports[0]}", "server_name": "localhost",
        "cert": pki / "connector.pem", "key": pki / "connector.key", "ca": pki / "ca.pem",
        "p2p_port": 0, "p2p_host": "::", "relay_host": "0.0.0.0", "metrics": "off",
    }, [f"web=10.100.0.2;tcp:80=127.0.0.1:{bport}"])
    conn = Connector(cfg)
    await conn.start()
    agent = Agent(AgentOptions(intermediate=("127.0.0.1", inter.ports[0]),
                               tls=TlsFiles.from_dir(pki, "agent"), server_name="localhost",
                               services=(parse_service("web=10.100.0.2"),), mode="userspace",
                               name="resume", state_dir=tmp / "state",
                               forwards=(parse_forward("127.0.0.1:0=web:80"),)))
    await agent.start()
    try:
        await agent.wait_ready()
        for _ in range(500):
            if agent.snapshot()["services"][0]["path"] == "direct":
                break
            await asyncio.sleep(0.02)
        assert agent.snapshot()["services"][0]["path"] == "direct"

        payload = os.urandom(SIZE)
        r, w = await asyncio.open_connection("127.0.0.1", agent.userspace.bound_port("tcp"))

        async def upload() -> None:
            for i in range(0, SIZE, 65536):
                w.write(payload[i : i + 65536])
                await w.drain()
            w.write_eof()

        up = asyncio.ensure_future(upload())
        got = bytearray()
        cut = False
        while True:
            data = await asyncio.wait_for(r.read(65536), 30)
            if not data:
                break
            got += data
            if not cut and len(got) >= CUT_AT:
                cut = True
                assert agent.userspace.stats["tcp_direct"] == 1   # the stream is on the direct path
                # the Connector still has to send data after the cut
                assert conn.stats.stream_bytes_to_agent < SIZE
                conn.p2p.endpoint.blackhole()                     # type: ignore[union-attr]
        await up
        w.close()
        assert cut
        assert len(got) == SIZE
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert agent.snapshot()["services"][0]["path"] == "relay"
        assert agent.userspace.stats["tcp_resumed"] == 1
        assert conn.stats.stream_resumed == 1
        assert conn.stats.stream_resume_refused == 0
    finally:
        await agent.stop()
        await conn.stop()
        await inter.stop()
        backend.close()


def test_stream_resumes_on_relay_when_direct_dies(pki: Path, tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_case(pki, tmp_path), 90))
