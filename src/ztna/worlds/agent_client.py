"""Test helpers for the Connector: an in-process Agent client over QUIC, backends, and
(root) a TUN-in-a-namespace Agent bridge so a real kernel TCP stack drives the tunnel."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.wire import (
    ControlMessage,
    Hello,
    Ping,
    Register,
    Role,
    encode_control,
    encode_service_datagram,
)


class AgentClient(ConnectionHandler):
    """A minimal Agent: registers services, sends 0x2F, receives bare IP packets."""

    def __init__(self) -> None:
        self.control: list[Any] = []
        self.packets: asyncio.Queue[bytes] = asyncio.Queue()
        self.streams: dict[int, bytearray] = {}
        self.stream_fin: dict[int, asyncio.Event] = {}
        self.resets: set[int] = set()
        self.conn: ZtnaConnection | None = None
        self.ep: QuicEndpoint | None = None

    async def connect(self, addr: tuple[str, int], pki: Path, services: list[str], *,
                      cert: str = "agent", server_name: str = "localhost",
                      instance: int | None = None) -> AgentClient:
        self.ep = QuicEndpoint(bind_udp("0.0.0.0", 0))
        tls = TlsFiles(cert=pki / f"{cert}.pem", key=pki / f"{cert}.key", ca=pki / "ca.pem")
        cfg = make_configuration(is_client=True, tls=tls, server_name=server_name)
        self.conn = self.ep.connect(addr, cfg, self)
        # Stream 0 is the control stream: open it first so data streams never take it. A
        # direct connection to a Connector must start with Hello (it names our agent id).
        first = Ping(id=1) if instance is None else Hello(instance=instance)
        self.conn.send_control(encode_control(first))
        await asyncio.wait_for(self.conn.wait_handshake(), 5)
        for s in services:
            self.conn.send_control(encode_control(Register(role=Role.AGENT, service_id=s)))
        return self

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        self.control.append(msg)

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        if data and data[0] >= 0x40:
            self.packets.put_nowait(data)

    def on_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool) -> None:
        self.streams.setdefault(sid, bytearray()).extend(data)
        conn.consume_stream(sid, len(data))
        if end:
            self.stream_fin.setdefault(sid, asyncio.Event()).set()

    def on_stream_reset(self, conn: ZtnaConnection, sid: int, code: int) -> None:
        self.resets.add(sid)
        self.stream_fin.setdefault(sid, asyncio.Event()).set()

    def send(self, service: str, packet: bytes) -> None:
        assert self.conn is not None
        self.conn.send_datagram(encode_service_datagram(service, packet))

    async def recv(self, timeout: float = 3.0) -> bytes:
        return await asyncio.wait_for(self.packets.get(), timeout)

    async def wait_registered(self, services: list[str], timeout: float = 5.0) -> None:
        from ztna.wire import RegistrationAck

        async def _wait() -> None:
            while {m.service_id for m in self.control if isinstance(m, RegistrationAck)} < set(services):
                await asyncio.sleep(0.02)
        await asyncio.wait_for(_wait(), timeout)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.ep is not None:
            self.ep._flush()
            self.ep.shutdown_socket()


class UdpEcho(asyncio.DatagramProtocol):
    """Echoes each datagram prefixed with `tag` (tells backends apart)."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(self.tag + data, addr)


async def udp_echo(tag: bytes) -> tuple[Any, int]:
    loop = asyncio.get_running_loop()
    t, _ = await loop.create_datagram_endpoint(lambda: UdpEcho(tag), local_addr=("127.0.0.1", 0))
    return t, t.get_extra_info("sockname")[1]


async def tcp_echo(tag: bytes) -> tuple[asyncio.AbstractServer, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(tag)
        while True:
            data = await r.read(65536)
            if not data:
                break
            w.write(data)
            await w.drain()
        w.write_eof()
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
