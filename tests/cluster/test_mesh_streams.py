"""Named streams and resumed streams behave the same whether the Connector is attached to the
Agent's own member or to another member of the cluster (real member processes and Redis):

* a named stream (0x58) reaches the backend the Connector resolves the name to (a real
  dnsmasq on loopback answers it), byte-exact; a name with no address gets NAME_UNRESOLVED
  and a name outside the service's patterns NOT_AUTHORIZED, from the Connector, through the
  mesh unchanged;
* a TCP stream on the direct path (punched, signaling across the mesh when the members differ)
  resumes on the relay when that path goes silent (StreamResume through the Agent's member and,
  across the mesh, the Connector's), with every byte echoed exactly."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest
from cluster_helpers import IntermediateProc, Peer
from intermediate_helpers import free_udp_port
from test_mesh import until_placed

from ztna import procs
from ztna.agent.agent import Agent
from ztna.agent.config import AgentOptions, parse_forward, parse_service
from ztna.certs import init_pki, issue
from ztna.connector.config import load_config
from ztna.connector.service import Connector
from ztna.quic.config import TlsFiles
from ztna.quic.connection import ZtnaConnection
from ztna.wire import NamedStreamOpen, RegistrationAck, Role, StreamStatus, encode_stream_open

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web", "corp"])
    issue(d, "member", "member", out_prefix=d / "member")
    return d


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[int]:
    exe = shutil.which("dnsmasq")
    if exe is None:
        pytest.fail("dnsmasq is not installed (.ci/run installs dnsmasq-base)")
    port = free_udp_port()
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text("\n".join([
        "no-resolv", "no-hosts", "keep-in-foreground", f"port={port}", "listen-address=127.0.0.1",
        "bind-interfaces", "user=root", f"pid-file={tmp_path / 'dnsmasq.pid'}", "log-facility=-",
        "local=/corp.test/", "host-record=app1.corp.test,127.0.0.1", ""]))
    proc = procs.spawn([exe, f"--conf-file={conf}"], log=tmp_path / "dnsmasq.log")

    def answers() -> bool:
        # Until it is bound, a query is refused and the Connector answers NAME_UNRESOLVED.
        reply = dns.query.udp(dns.message.make_query("app1.corp.test", "A"), "127.0.0.1", port=port, timeout=0.5)
        return bool(reply.answer)

    procs.wait_until(answers, timeout=10, what="dnsmasq answering", watch=[proc], retry_on=(OSError, dns.exception.Timeout))
    yield port
    proc.terminate()
    proc.wait(5)


async def _stream(conn: ZtnaConnection, peer: Peer, header: NamedStreamOpen, body: bytes) -> bytes:
    """One stream: `header`, `body`, FIN; what came back once the other side ended it."""
    reply = bytearray()
    ended = asyncio.Event()
    sid = conn.open_stream()

    def on_stream_data(c: ZtnaConnection, s: int, data: bytes, end: bool) -> None:
        if s != sid:
            return
        reply.extend(data)
        c.consume_stream(s, len(data))
        if end:
            ended.set()

    peer.on_stream_data = on_stream_data  # type: ignore[method-assign]
    conn.send_stream(sid, encode_stream_open(header) + body, end=True)
    await asyncio.wait_for(ended.wait(), 20)
    return bytes(reply)


@pytest.mark.parametrize("agent_on", ["same-member", "other-member"])
def test_named_streams_across_the_mesh(
        agent_on: str, pki: Path, cluster: tuple[IntermediateProc, IntermediateProc],
        dnsmasq: int, tmp_path: Path) -> None:
    i1, i2 = cluster
    attach = i2 if agent_on == "same-member" else i1

    async def main() -> None:
        async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            digest = hashlib.sha256()
            while data := await r.read(65536):
                digest.update(data)
            w.write(digest.hexdigest().encode())
            await w.drain()
            w.close()

        backend = await asyncio.start_server(sink, "127.0.0.1", 0)
        bport = backend.sockets[0].getsockname()[1]
        log = open(tmp_path / "connector.log", "wb")  # noqa: SIM115
        connector = subprocess.Popen(
            [sys.executable, "-m", "ztna", "connector", "--intermediate", f"127.0.0.1:{i2.port}",
             "--server-name", "localhost", "--pki", str(pki), "--p2p-port", "off", "--metrics", "off",
             "--dns-server", f"127.0.0.1:{dnsmasq}", "--service", f"corp=*.corp.test;tcp:80=:{bport}"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            agent = await Peer().connect("127.0.0.1", attach.port, TlsFiles.from_dir(pki, "agent"))
            assert isinstance(await agent.register(Role.AGENT, "corp"), RegistrationAck)
            await until_placed(attach, "corp")
            conn = agent.conn
            assert conn is not None
            body = os.urandom(300_000)
            got = await _stream(conn, agent, NamedStreamOpen("corp", "app1.corp.test", 80), body)
            assert got[0] == StreamStatus.OK, got[:1]
            assert got[1:].decode() == hashlib.sha256(body).hexdigest()
            got = await _stream(conn, agent, NamedStreamOpen("corp", "nothere.corp.test", 80), b"x")
            assert got == bytes((StreamStatus.NAME_UNRESOLVED,))
            got = await _stream(conn, agent, NamedStreamOpen("corp", "app1.elsewhere.test", 80), b"x")
            assert got == bytes((StreamStatus.NOT_AUTHORIZED,))
            await agent.close()
        finally:
            connector.terminate()
            connector.wait(10)
            log.close()
            backend.close()

    asyncio.run(asyncio.wait_for(main(), 120))
    crossed = i1.metrics().get('ztna_mesh_streams_total{direction="forwarded"}', 0)
    received = i2.metrics().get('ztna_mesh_streams_total{direction="received"}', 0)
    assert (crossed, received) == ((0, 0) if agent_on == "same-member" else (3, 3))


SIZE = 16 * 1024 * 1024
CUT_AT = 256 * 1024     # loopback socket buffers hold MBs: cut early so QUIC still has work


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("agent_on", ["same-member", "other-member"])
def test_stream_resumes_across_the_mesh(
        agent_on: str, pki: Path, cluster: tuple[IntermediateProc, IntermediateProc],
        tmp_path: Path) -> None:
    i1, i2 = cluster
    attach = i2 if agent_on == "same-member" else i1

    async def main() -> None:
        backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
        bport = backend.sockets[0].getsockname()[1]
        cfg = load_config(None, {
            "intermediate": f"127.0.0.1:{i2.port}", "server_name": "localhost",
            "cert": pki / "connector.pem", "key": pki / "connector.key", "ca": pki / "ca.pem",
            "p2p_port": 0, "p2p_host": "::", "relay_host": "0.0.0.0", "metrics": "off",
        }, [f"web=10.100.0.2;tcp:80=127.0.0.1:{bport}"])
        conn = Connector(cfg)
        await conn.start()
        agent = Agent(AgentOptions(intermediate=("127.0.0.1", attach.port),
                                   tls=TlsFiles.from_dir(pki, "agent"), server_name="localhost",
                                   services=(parse_service("web=10.100.0.2"),), mode="userspace",
                                   name="resume", state_dir=tmp_path / "state",
                                   forwards=(parse_forward("127.0.0.1:0=web:80"),)))
        await agent.start()
        try:
            await agent.wait_ready()
            await until_placed(attach, "web")
            for _ in range(1000):
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
                    assert agent.userspace.stats["tcp_direct"] == 1
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
            backend.close()

    asyncio.run(asyncio.wait_for(main(), 150))
    crossed = i1.metrics().get('ztna_mesh_streams_total{direction="forwarded"}', 0)
    assert crossed == (0 if agent_on == "same-member" else 1)      # the resume
