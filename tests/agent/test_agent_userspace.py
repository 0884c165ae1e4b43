"""Userspace mode without root, on loopback, with the real Agent classes.

* UDP forward through a real Intermediate and an in-process echoing fake Connector.
* TCP forward and SOCKS5 against a fake Intermediate that ACKs registrations and answers
  each stream with status OK and an echo of everything (plus FIN), checked by sha256.
* Registration retried until ACK and a refused service reported as refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_connector import Echo  # noqa: E402

from ztna.agent.agent import Agent
from ztna.agent.config import AgentOptions, parse_forward, parse_service
from ztna.certs import init_pki
from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, ServerOptions, bind_udp
from ztna.wire import (
    ControlMessage,
    Register,
    RegistrationAck,
    Role,
    StreamOpen,
    decode_stream_header,
    encode_control,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web", "dns"])
    return d


def _options(pki: Path, port: int, tmp: Path, **kw: object) -> AgentOptions:
    return AgentOptions(intermediate=("127.0.0.1", port), tls=TlsFiles.from_dir(pki, "agent"),
                        services=(parse_service("web=10.100.0.2,fd00:100::2"), parse_service("dns=10.100.0.53")),
                        mode="userspace", name="t", state_dir=tmp / "state", **kw)


# ---------------------------------------------------------------- UDP via a real Intermediate
async def _udp_case(pki: Path, tmp: Path) -> None:
    srv = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(pki, "intermediate"),
                                           listen=[("127.0.0.1", 0)], metrics=None))
    await srv.start()
    ep = QuicEndpoint(bind_udp("127.0.0.1", 0))
    conn = ep.connect(("127.0.0.1", srv.ports[0]),
                      make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "connector")), Echo())
    await conn.wait_handshake()
    for s in ("web", "dns"):
        conn.send_control(encode_control(Register(role=Role.CONNECTOR, service_id=s)))
    agent = Agent(_options(pki, srv.ports[0], tmp, udp_forwards=(
        parse_forward("127.0.0.1:0=dns:53", "-U"), parse_forward("127.0.0.1:0=[fd00:100::2]:7", "-U"))))
    await agent.start()
    try:
        await agent.wait_ready()
        loop = asyncio.get_running_loop()
        for index in (0, 1):
            port = agent.userspace.bound_port("udp", index)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect(("127.0.0.1", port))
            payload = os.urandom(1000)
            await loop.sock_sendall(s, payload)
            data = await asyncio.wait_for(loop.sock_recv(s, 65535), 5)
            assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
            s.close()
        snap = agent.snapshot()
        dns = next(x for x in snap["services"] if x["id"] == "dns")
        assert dns["tx_packets"] == 1 and dns["rx_packets"] == 1
        assert dns["rx_bytes"] == 20 + 8 + 1000
        assert snap["userspace"]["udp_mappings"] == 2
    finally:
        await agent.stop()
        ep.close()
        ep.shutdown_socket()
        await srv.stop()


def test_udp_forward_through_real_intermediate(pki: Path, tmp_path: Path) -> None:
    asyncio.run(_udp_case(pki, tmp_path))


# ---------------------------------------------------------------- fake Intermediate for streams
class FakeIntermediate(ConnectionHandler):
    """ACKs every registration (after ignoring the first `ignore` requests), echoes streams."""

    def __init__(self, ignore: int = 0) -> None:
        self.ignore = ignore
        self.registers: list[str] = []
        self.headers: list[StreamOpen] = []
        self.bufs: dict[int, bytearray] = {}

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        if isinstance(msg, Register):
            self.registers.append(msg.service_id)
            if len(self.registers) > self.ignore:
                conn.send_control(encode_control(RegistrationAck(service_id=msg.service_id)))

    def on_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool) -> None:
        buf = self.bufs.get(sid)
        if buf is None:
            buf = self.bufs[sid] = bytearray()
            buf.extend(data)
            parsed = decode_stream_header(bytes(buf))
            if parsed is None:
                return
            header, used = parsed
            self.headers.append(header)
            data = bytes(buf[used:])
            conn.send_stream(sid, b"\x00")
        conn.send_stream(sid, data, end)
        conn.consume_stream(sid, len(data))


async def _fake_server(pki: Path, handler: FakeIntermediate) -> QuicEndpoint:
    cfg = make_configuration(is_client=False, tls=TlsFiles.from_dir(pki, "intermediate"))
    return QuicEndpoint(bind_udp("127.0.0.1", 0), server=ServerOptions(
        configuration=cfg, handler_factory=lambda: handler, retry=False))


async def _socks_connect(port: int, host: bytes, dport: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"\x05\x01\x00")
    assert await r.readexactly(2) == b"\x05\x00"
    w.write(b"\x05\x01\x00\x03" + bytes((len(host),)) + host + struct.pack("!H", dport))
    reply = await r.readexactly(10)
    return r, w, reply


async def _tcp_case(pki: Path, tmp: Path) -> None:
    handler = FakeIntermediate(ignore=1)   # first Register is "lost": must be re-sent
    ep = await _fake_server(pki, handler)
    opts = _options(pki, ep.local_address[1], tmp, forwards=(parse_forward("127.0.0.1:0=web:80"),),
                    socks=("127.0.0.1", 0), register_retry=0.2)
    agent = Agent(opts)
    await agent.start()
    try:
        await agent.wait_ready()
        assert handler.registers.count(handler.registers[0]) >= 2
        payload = os.urandom(3 * 1024 * 1024)
        r, w = await asyncio.open_connection("127.0.0.1", agent.userspace.bound_port("tcp"))
        w.write(payload)
        w.write_eof()
        got = await asyncio.wait_for(r.read(), 30)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
        w.close()
        assert handler.headers[0] == StreamOpen(service_id="web", dst_ip="10.100.0.2", dst_port=80)

        sport = agent.userspace.bound_port("socks5")
        r, w, reply = await _socks_connect(sport, b"web.ztna", 443)
        assert reply == b"\x05\x00\x00\x01" + bytes([10, 100, 0, 2]) + struct.pack("!H", 443)
        w.write(b"hello socks")
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 10) == b"hello socks"
        w.close()
        assert handler.headers[-1] == StreamOpen(service_id="web", dst_ip="10.100.0.2", dst_port=443)

        r, w, reply = await _socks_connect(sport, b"nosuch", 80)
        assert reply[1] == 0x04   # host unreachable
        w.close()
    finally:
        await agent.stop()
        ep.close()
        ep.shutdown_socket()
    assert not (tmp / "state" / "t.sock").exists()


def test_tcp_forward_and_socks5_over_streams(pki: Path, tmp_path: Path) -> None:
    asyncio.run(_tcp_case(pki, tmp_path))
