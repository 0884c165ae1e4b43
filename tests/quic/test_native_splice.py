"""Native splices between real processes' worth of sockets on loopback: a QUIC stream joined
to a kernel TCP connection (both ways, half-close, reset) and two streams of one endpoint
joined to each other, checked by sha256, with the bytes never handed to Python."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from ztna import _native
from ztna.certs import init_pki
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, ServerOptions, bind_udp

UP = 4 * 1024 * 1024 + 7
DOWN = 3 * 1024 * 1024 + 11


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web"])
    return d


class Client(ConnectionHandler):
    def __init__(self) -> None:
        self.data: dict[int, bytearray] = {}
        self.fin: dict[int, asyncio.Event] = {}
        self.reset: dict[int, int] = {}

    def on_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool) -> None:
        self.data.setdefault(sid, bytearray()).extend(data)
        conn.consume_stream(sid, len(data))
        if end:
            self.fin.setdefault(sid, asyncio.Event()).set()

    def on_stream_reset(self, conn: ZtnaConnection, sid: int, code: int) -> None:
        self.reset[sid] = code
        self.fin.setdefault(sid, asyncio.Event()).set()


class Splicer(ConnectionHandler):
    """Reads a 4-byte header per stream, then splices the stream to a TCP connection to
    `backend` (what came after the header goes first, unconsumed)."""

    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self.head: dict[int, bytes] = {}
        self.after_splice = 0        # stream bytes Python saw after handing the stream over
        self.ends: list[tuple[int, int, int, int]] = []
        self.ended = asyncio.Event()
        self.socks: list[socket.socket] = []

    def on_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool) -> None:
        if self.head.get(sid) == b"done":
            self.after_splice += len(data)
            return
        head = self.head.get(sid, b"") + data
        if len(head) < 4:
            self.head[sid] = head
            return
        self.head[sid] = b"done"
        conn.consume_stream(sid, 4)
        sock = socket.create_connection(self.backend)
        self.socks.append(sock)

        def on_end(how: int, code: int, sent: int, received: int) -> None:
            self.ends.append((how, code, sent, received))
            sock.close()
            self.ended.set()

        conn.splice(sid, sock, on_end, down=head[4:], down_fin=end)


async def _world(pki: Path, backend: tuple[str, int]) -> tuple[QuicEndpoint, QuicEndpoint, Splicer, Client, ZtnaConnection]:
    splicer = Splicer(backend)
    scfg = make_configuration(is_client=False, tls=TlsFiles.from_dir(pki, "intermediate"))
    server = QuicEndpoint(bind_udp("127.0.0.1", 0), server=ServerOptions(
        configuration=scfg, handler_factory=lambda: splicer, retry=False))
    client_ep = QuicEndpoint(bind_udp("127.0.0.1", 0))
    client = Client()
    ccfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "agent"), server_name="localhost")
    conn = client_ep.connect(("127.0.0.1", server.local_address[1]), ccfg, client)
    await asyncio.wait_for(conn.wait_handshake(), 5)
    return server, client_ep, splicer, client, conn


def test_stream_to_tcp_both_ways_with_half_close(pki: Path) -> None:
    up, down = os.urandom(UP), os.urandom(DOWN)

    async def main() -> None:
        got = bytearray()
        accepted = asyncio.Event()

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set()
            while chunk := await reader.read(65536):     # until the tunnel's FIN
                got.extend(chunk)
            writer.write(down)                            # then the answer (half-close)
            await writer.drain()
            writer.write_eof()
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(backend, "127.0.0.1", 0)
        server, client_ep, splicer, client, conn = await _world(pki, srv.sockets[0].getsockname()[:2])
        sid = conn.open_stream()
        conn.send_stream(sid, b"HEAD" + up[:1000])
        await asyncio.wait_for(accepted.wait(), 5)
        assert server.native.splice_count() == 1
        conn.send_stream(sid, up[1000:], end=True)
        await asyncio.wait_for(client.fin.setdefault(sid, asyncio.Event()).wait(), 30)
        await asyncio.wait_for(splicer.ended.wait(), 10)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(up).hexdigest()
        assert hashlib.sha256(client.data[sid]).hexdigest() == hashlib.sha256(down).hexdigest()
        assert splicer.ends == [(_native.SPLICE_DONE, 0, DOWN, UP)]
        assert splicer.after_splice == 0, "stream bytes reached Python after the splice"
        assert server.native.splice_count() == 0
        conn.close()
        client_ep.shutdown_socket()
        server.shutdown_socket()
        srv.close()

    asyncio.run(main())


def test_stream_reset_aborts_the_tcp_side_and_tcp_reset_resets_the_stream(pki: Path) -> None:
    async def main() -> None:
        events: list[str] = []
        done = asyncio.Event()
        writers: list[asyncio.StreamWriter] = []

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            try:
                while await reader.read(65536):
                    pass
                events.append("eof")
            except ConnectionError:
                events.append("reset")
            done.set()

        srv = await asyncio.start_server(backend, "127.0.0.1", 0)
        server, client_ep, splicer, client, conn = await _world(pki, srv.sockets[0].getsockname()[:2])
        # 1. The tunnel side resets: the splice ends as a reset and the backend is cut off.
        sid = conn.open_stream()
        conn.send_stream(sid, b"HEADxyz")
        while server.native.splice_count() == 0:
            await asyncio.sleep(0.01)
        conn.reset_stream(sid, 9)
        await asyncio.wait_for(splicer.ended.wait(), 5)
        assert splicer.ends[0][:2] == (_native.SPLICE_RESET, 9)
        await asyncio.wait_for(done.wait(), 5)
        assert events == ["eof"] or events == ["reset"]
        # 2. The backend goes away with RST: the stream is reset towards the client.
        splicer.ended.clear()
        s2 = conn.open_stream()
        conn.send_stream(s2, b"HEAD")
        while len(writers) < 2:
            await asyncio.sleep(0.01)
        sock: Any = writers[1].get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writers[1].transport.abort()
        await asyncio.wait_for(client.fin.setdefault(s2, asyncio.Event()).wait(), 5)
        assert s2 in client.reset
        await asyncio.wait_for(splicer.ended.wait(), 5)
        assert splicer.ends[1][0] == _native.SPLICE_FAILED
        conn.close()
        client_ep.shutdown_socket()
        server.shutdown_socket()
        srv.close()

    asyncio.run(main())


class PairMaker(ConnectionHandler):
    """The first connection's first stream is joined to a stream opened on the second."""

    def __init__(self, owner: list[ZtnaConnection]) -> None:
        self.owner = owner
        self.ends: list[tuple[int, int, int, int]] = []
        self.ended = asyncio.Event()
        self.seen_after = 0
        self.started = False

    def on_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool) -> None:
        if self.started:
            self.seen_after += len(data)
            return
        self.started = True
        other = self.owner[1]
        tsid = other.open_stream()
        other.send_stream(tsid, data)       # the "header" and whatever came with it
        conn.consume_stream(sid, len(data))

        def on_end(how: int, code: int, sent: int, received: int) -> None:
            self.ends.append((how, code, sent, received))
            self.ended.set()

        ep: Any = conn.endpoint
        assert ep.splice_streams(conn, sid, other, tsid, on_end)


def test_two_streams_of_one_endpoint_spliced_natively(pki: Path) -> None:
    up, down = os.urandom(UP), os.urandom(DOWN)

    async def main() -> None:
        conns: list[ZtnaConnection] = []
        maker = PairMaker(conns)
        scfg = make_configuration(is_client=False, tls=TlsFiles.from_dir(pki, "intermediate"))
        server = QuicEndpoint(bind_udp("127.0.0.1", 0), server=ServerOptions(
            configuration=scfg, handler_factory=lambda: maker, retry=False))
        ccfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "agent"), server_name="localhost")
        eps, clients, cconns = [], [], []
        for _ in range(2):
            ep = QuicEndpoint(bind_udp("127.0.0.1", 0))
            cl = Client()
            c = ep.connect(("127.0.0.1", server.local_address[1]), ccfg, cl)
            await asyncio.wait_for(c.wait_handshake(), 5)
            while len(server.connections) < len(eps) + 1:
                await asyncio.sleep(0.01)
            conns.append(next(x for x in server.connections if x not in conns))
            eps.append(ep)
            clients.append(cl)
            cconns.append(c)
        a, b = cconns
        sid = a.open_stream()
        a.send_stream(sid, b"HDR!")
        while not clients[1].data:
            await asyncio.sleep(0.01)
        bsid = next(iter(clients[1].data))
        a.send_stream(sid, up, end=True)
        await asyncio.wait_for(clients[1].fin.setdefault(bsid, asyncio.Event()).wait(), 30)
        b.send_stream(bsid, down, end=True)
        await asyncio.wait_for(clients[0].fin.setdefault(sid, asyncio.Event()).wait(), 30)
        await asyncio.wait_for(maker.ended.wait(), 10)
        assert bytes(clients[1].data[bsid]) == b"HDR!" + up
        assert hashlib.sha256(clients[0].data[sid]).digest() == hashlib.sha256(down).digest()
        # Once, with the first stream's counts: DOWN went into it, UP came out of it.
        assert maker.ends == [(_native.SPLICE_DONE, 0, DOWN, UP)]
        assert maker.seen_after == 0
        for ep in eps:
            ep.shutdown_socket()
        server.shutdown_socket()

    asyncio.run(main())
