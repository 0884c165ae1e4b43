"""Wire compatibility with an independent QUIC implementation: an aioquic 1.7.2 client,
driven here directly on `aioquic.quic.connection.QuicConnection` over a plain UDP socket
(nothing from `ztna.quic` on its side), talks to a real `ztna intermediate` process that
runs on the native core (quinn-proto + rustls).

Only the byte codecs of `ztna.wire` / `ztna.netstack.packets` are shared with the code
under test: they are the contract (docs/protocol.md, checked against its vectors in
tests/wire). The Connector side of the relay is the in-test echoing peer on the native
adapter (`Peer(echo=True)`), so the echo test crosses both stacks."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "intermediate"))
from aioquic.buffer import size_uint_var  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.connection import QuicConnection  # noqa: E402
from aioquic.quic.events import (  # noqa: E402
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
)
from aioquic.quic.packet_builder import PACKET_NUMBER_SEND_SIZE  # noqa: E402
from intermediate_helpers import IntermediateProc, Peer  # noqa: E402

from ztna.certs import init_pki  # noqa: E402
from ztna.netstack.packets import (  # noqa: E402
    PROTO_UDP,
    build_udp_packet,
    ip_to_bytes,
    parse_ip,
    parse_udp,
    verify_checksums,
)
from ztna.quic.config import TlsFiles  # noqa: E402
from ztna.quic.connection import CLOSE_AUTH  # noqa: E402
from ztna.wire import (  # noqa: E402
    ControlDecoder,
    NackStatus,
    ObservedAddress,
    Register,
    RegistrationAck,
    RegistrationNack,
    Role,
    decode_qad,
    decode_registration,
    encode_control,
    encode_service_datagram,
    service_datagram_overhead,
)

pytestmark = pytest.mark.timeout(90)

ALPN = "ztna-v1"
WAIT = 5.0            # every wait below is bounded by this many seconds
AEAD_TAG = 16         # AES-GCM / ChaCha20-Poly1305 tag in every 1-RTT packet
AGENT_IP, AGENT_PORT = "10.0.0.9", 4000
VIP, VIP_PORT = "10.1.2.3", 9999
AGENT_IP6, VIP6 = "fd00:9::9", "fd00:1::3"


# ------------------------------------------------------------------------ the aioquic peer

class AioquicClient(asyncio.DatagramProtocol):
    """An aioquic QuicConnection on its own UDP socket, pumped by the asyncio loop: every
    received datagram and timer runs `next_event` and then `datagrams_to_send`."""

    def __init__(self, server: tuple[str, int], *, ca: Path, cert: Path, key: Path,
                 alpn: str = ALPN, server_name: str = "localhost") -> None:
        config = QuicConfiguration(
            is_client=True, alpn_protocols=[alpn], max_datagram_frame_size=65536,
            server_name=server_name,
        )
        config.load_verify_locations(str(ca))
        config.load_cert_chain(str(cert), str(key))
        self.config = config
        self.quic = QuicConnection(configuration=config)
        self.server = server
        self.events: list[QuicEvent] = []
        self.sent_sizes: list[int] = []       # UDP payload sizes this client sent
        self.control = ControlDecoder()       # the server's side of stream 0
        self.control_messages: list[object] = []
        self.datagrams: list[bytes] = []
        self._changed: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self.local: tuple[str, int] = ("", 0)

    # -- driving
    async def start(self) -> AioquicClient:
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        host = self.server[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        sock.setblocking(False)
        self.local = sock.getsockname()[:2]
        self._transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self.quic.connect(self.server, now=loop.time())
        self._pump()
        return self

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._transport is None:
            return
        self.quic.receive_datagram(data, addr[:2], now=asyncio.get_running_loop().time())
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        self.quic.handle_timer(now=asyncio.get_running_loop().time())
        self._pump()

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while (event := self.quic.next_event()) is not None:
            self.events.append(event)
            if isinstance(event, StreamDataReceived) and event.stream_id == 0:
                self.control_messages += self.control.feed(event.data)
            elif isinstance(event, DatagramFrameReceived):
                self.datagrams.append(event.data)
        assert self._transport is not None
        for data, addr in self.quic.datagrams_to_send(now=loop.time()):
            self.sent_sizes.append(len(data))
            self._transport.sendto(data, addr)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.quic.get_timer()
        if at is not None:
            self._timer = loop.call_at(at, self._on_timer)
        assert self._changed is not None
        self._changed.set()

    async def until(self, pred: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        """Wait (bounded) until `pred()` is truthy; return its value."""
        assert self._changed is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while not (value := pred()):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; events: {self.events!r}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return value

    # -- queries
    def first(self, kind: type) -> Any:
        return next((e for e in self.events if isinstance(e, kind)), None)

    async def handshake(self) -> HandshakeCompleted:
        done = await self.until(lambda: self.first(HandshakeCompleted) or self.first(ConnectionTerminated),
                                "the handshake")
        assert isinstance(done, HandshakeCompleted), done
        return done

    async def terminated(self, timeout: float = WAIT) -> ConnectionTerminated:
        return await self.until(lambda: self.first(ConnectionTerminated), "the connection to close", timeout)

    def ip_packets(self) -> list[bytes]:
        """Received DATAGRAMs that are bare IP packets (docs/protocol.md §2: 0x45-0x4F, 0x60-0x6F)."""
        return [d for d in self.datagrams if d and (0x45 <= d[0] <= 0x4F or 0x60 <= d[0] <= 0x6F)]

    # -- sending
    def send_control(self, frame: bytes) -> None:
        self.quic.send_stream_data(0, frame, end_stream=False)
        self._pump()

    def send_datagram(self, data: bytes) -> None:
        self.quic.send_datagram_frame(data)
        self._pump()

    def max_datagram_payload(self) -> int:
        """The largest DATAGRAM payload this aioquic client can put in one 1-RTT packet:
        its packet size (`max_datagram_size`) minus the short header (1 + DCID + packet
        number), the AEAD tag and the DATAGRAM frame's type + length varint. aioquic does
        not split or drop a larger one; it would stay queued forever."""
        dcid = len(self.quic._peer_cid.cid)  # aioquic 1.7.2 private: the CID it sends to
        room = self.config.max_datagram_size - (1 + dcid + PACKET_NUMBER_SEND_SIZE) - AEAD_TAG - 1
        n = room - 1
        while n + size_uint_var(n) > room:
            n -= 1
        return n

    async def register(self, service: str) -> object:
        self.send_control(encode_control(Register(role=Role.AGENT, service_id=service)))

        def reply() -> object:
            for m in self.control_messages:
                if isinstance(m, RegistrationAck | RegistrationNack) and m.service_id == service:
                    return m
            for d in self.datagrams:  # the protocol also assigns 0x12/0x13 as DATAGRAMs
                if d[:1] in (b"\x12", b"\x13"):
                    m = decode_registration(d)
                    if m.service_id == service:
                        return m
            return None
        return await self.until(reply, f"the registration reply for {service!r}")

    async def close(self) -> None:
        if self._transport is None:
            return
        if not self.first(ConnectionTerminated):
            self.quic.close(error_code=0, reason_phrase="test done")
            self._pump()
        await asyncio.sleep(0.02)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport, self._transport = self._transport, None
        transport.close()


# ------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["echo"])            # agent.pem / connector.pem name only "echo"
    return d


@pytest.fixture(scope="module")
def server(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IntermediateProc]:
    # Listens on [::] (dual-stack): both 127.0.0.1 and ::1 reach it.
    proc = IntermediateProc(["--pki", str(pki), "--handshakes-per-second", "1000"],
                            tmp_path_factory.mktemp("log") / "intermediate.log").start()
    yield proc
    assert proc.stop() == 0, proc.log()


def client(server: IntermediateProc, pki: Path, host: str = "127.0.0.1", ident: str = "agent",
           **kw: Any) -> AioquicClient:
    return AioquicClient((host, server.port), ca=pki / "ca.pem", cert=pki / f"{ident}.pem",
                         key=pki / f"{ident}.key", **kw)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ------------------------------------------------------------------------ 1. QAD

@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_qad_datagram_is_the_aioquic_socket_source(server: IntermediateProc, pki: Path, host: str) -> None:
    async def main() -> None:
        c = await client(server, pki, host).start()
        try:
            done = await c.handshake()
            assert done.alpn_protocol == ALPN
            # The DATAGRAM extension is on in both directions (transport parameters).
            assert c.quic._remote_max_datagram_frame_size is not None
            assert c.quic._remote_max_datagram_frame_size >= 1200
            qad = await c.until(lambda: next((d for d in c.datagrams if d[:1] == b"\x01"), None),
                                "the QAD DATAGRAM")
            ip, port = c.local
            family = b"\x06" if ":" in ip else b"\x04"
            expected = b"\x01" + family + ipaddress.ip_address(ip).packed + port.to_bytes(2, "big")
            assert qad == expected, (qad.hex(), expected.hex())
            assert decode_qad(qad) == ObservedAddress(ip=ip, port=port)
            # The same address on the control stream once aioquic opens stream 0 (its first
            # client-initiated bidirectional stream) by writing on it.
            assert c.quic.get_next_available_stream_id() == 0
            assert isinstance(await c.register("echo"), RegistrationAck)
            on_stream = await c.until(
                lambda: next((m for m in c.control_messages if isinstance(m, ObservedAddress)), None),
                "QAD on the control stream")
            assert on_stream == ObservedAddress(ip=ip, port=port)
        finally:
            await c.close()
    run(main())


# ------------------------------------------------------------------------ 2. registration

def test_registration_ack_and_not_authorized_nack(server: IntermediateProc, pki: Path) -> None:
    async def main() -> None:
        c = await client(server, pki).start()
        try:
            await c.handshake()
            assert c.quic.get_next_available_stream_id() == 0
            ack = await c.register("echo")
            assert ack == RegistrationAck(service_id="echo")
            nack = await c.register("secret")   # not in the agent certificate's SANs
            assert nack == RegistrationNack(service_id="secret", status=NackStatus.NOT_AUTHORIZED)
            # Byte check of what arrived on stream 0: the two replies, framed as §4.1 says.
            stream0 = b"".join(e.data for e in c.events
                               if isinstance(e, StreamDataReceived) and e.stream_id == 0)
            assert bytes.fromhex("0007 12 00 04") + b"echo" in stream0
            assert bytes.fromhex("0009 13 02 06") + b"secret" in stream0
            # The connection is still fine after a NACK.
            assert c.first(ConnectionTerminated) is None
        finally:
            await c.close()
    run(main())


# ------------------------------------------------------------------------ 3. UDP echo

@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_udp_echo_through_the_relay_byte_exact(server: IntermediateProc, pki: Path, host: str) -> None:
    async def main() -> None:
        connector = await Peer(echo=True).connect("127.0.0.1", server.port,
                                                  TlsFiles.from_dir(pki, "connector"))
        c = await client(server, pki, host).start()
        try:
            assert isinstance(await connector.register(Role.CONNECTOR, "echo"), RegistrationAck)
            await c.handshake()
            assert isinstance(await c.register("echo"), RegistrationAck)

            biggest = c.max_datagram_payload()
            overhead = service_datagram_overhead("echo")
            assert overhead == 2 + len("echo")
            v4_header, v6_header = 20 + 8, 40 + 8
            cases: list[tuple[str, str, int]] = [
                (AGENT_IP, VIP, n) for n in (0, 1, 100, 512, 1000)
            ]
            cases.append((AGENT_IP, VIP, biggest - overhead - v4_header))      # the largest
            cases.append((AGENT_IP6, VIP6, biggest - overhead - v6_header))    # the largest, v6
            seen = 0
            for i, (src, dst, size) in enumerate(cases):
                payload = bytes((i * 31 + k * 7) & 0xFF for k in range(size))
                packet = build_udp_packet(ip_to_bytes(src), ip_to_bytes(dst), AGENT_PORT, VIP_PORT, payload)
                dgram = encode_service_datagram("echo", packet)
                assert len(dgram) <= biggest
                before = len(c.sent_sizes)
                c.send_datagram(dgram)
                reply = await c.until(lambda: c.ip_packets()[seen:] and c.ip_packets()[seen],  # noqa: B023 - awaited before seen changes
                                      f"echo of {size} bytes")
                if len(dgram) == biggest:
                    # It really was the largest: it filled a whole aioquic packet. Checked
                    # once the echo is back, because aioquic's pacing may hold the DATAGRAM
                    # frame past the first transmit (which then carries only an ACK).
                    assert c.config.max_datagram_size in c.sent_sizes[before:], c.sent_sizes[before:]
                seen += 1
                # Byte-exact: the Connector's reply, stripped of 0x31 by the Intermediate, as a
                # bare IP packet from the virtual address back to the sender.
                expected = build_udp_packet(ip_to_bytes(dst), ip_to_bytes(src), VIP_PORT, AGENT_PORT, payload)
                assert reply == expected, (size, reply[:48].hex(), expected[:48].hex())
                ip = parse_ip(reply)
                assert ip.proto == PROTO_UDP and ip.src == ip_to_bytes(dst) and ip.dst == ip_to_bytes(src)
                udp = parse_udp(reply, ip)
                assert (udp.sport, udp.dport) == (VIP_PORT, AGENT_PORT)
                assert bytes(udp.payload) == payload
                assert verify_checksums(reply)
            assert connector.echoed == len(cases)
            # Everything else that came as a DATAGRAM is the one QAD (no stray bytes).
            others = [d for d in c.datagrams if d not in c.ip_packets()]
            assert len(others) == 1 and decode_qad(others[0]) == ObservedAddress(*c.local), others
            assert c.first(ConnectionTerminated) is None
        finally:
            await c.close()
            await connector.close()
    run(main())


# ------------------------------------------------------------------------ 4. foreign CA

def test_certificate_from_another_ca_is_closed_with_close_auth(server: IntermediateProc, pki: Path,
                                                               tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_pki(other, ["echo"])

    async def main() -> None:
        # Trusts the right CA (the server is genuine) but presents a foreign agent certificate.
        c = AioquicClient(("127.0.0.1", server.port), ca=pki / "ca.pem",
                          cert=other / "agent.pem", key=other / "agent.key")
        await c.start()
        try:
            c.send_control(encode_control(Register(role=Role.AGENT, service_id="echo")))
            closed = await c.terminated()
            assert closed.error_code == CLOSE_AUTH == 0x2, closed
            assert closed.frame_type is None       # an application close (frame 0x1d)
            assert closed.reason_phrase.startswith("invalid client certificate"), closed
            # Nothing was served to it: no QAD, no registration reply.
            assert c.datagrams == []
            assert not any(isinstance(m, RegistrationAck | RegistrationNack | ObservedAddress)
                           for m in c.control_messages)
        finally:
            await c.close()
    run(main())


# ------------------------------------------------------------------------ 5. wrong ALPN

def test_wrong_alpn_fails_the_handshake(server: IntermediateProc, pki: Path) -> None:
    async def main() -> None:
        c = await client(server, pki, alpn="h3").start()
        try:
            closed = await c.terminated()
            assert c.first(HandshakeCompleted) is None
            # TLS alert no_application_protocol (120) as a CRYPTO_ERROR (0x100 + alert).
            assert closed.error_code == 0x100 + 120, closed
            assert c.datagrams == [] and c.control_messages == []
        finally:
            await c.close()
    run(main())
