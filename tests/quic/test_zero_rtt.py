"""0-RTT reconnection and its replay protection, with a real Intermediate on loopback."""

from __future__ import annotations

import asyncio
import socket
import stat

import pytest

from ztna.certs import init_pki
from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.quic.tickets import ClientTicketCache, ServerTicketStore
from ztna.wire import (
    AddressToken,
    ControlDecoder,
    Register,
    RegistrationAck,
    Role,
    encode_control,
)


class Recorder(ConnectionHandler):
    def __init__(self) -> None:
        self.decoder = ControlDecoder()
        self.messages: list[object] = []
        self.acked = asyncio.Event()

    def on_control(self, conn, data):
        self.messages += self.decoder.feed(data)
        if any(isinstance(m, RegistrationAck) for m in self.messages):
            self.acked.set()

    def token(self) -> bytes:
        tokens = [m for m in self.messages if isinstance(m, AddressToken)]
        return tokens[-1].token_bytes if tokens else b""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["echo"], ["localhost", "127.0.0.1", "::1"], 1)
    return d


class Client:
    """Connects, registers as agent for 'echo', keeps tickets and tokens like the Agent."""

    def __init__(self, pki, port: int, cache: ClientTicketCache) -> None:
        self.pki, self.port, self.cache = pki, port, cache
        self.token = b""
        self.sent: list[bytes] = []

    async def connect(self, *, use_ticket: bool = True):
        sock = bind_udp("127.0.0.1", 0)
        ep = QuicEndpoint(sock)
        raw_send = sock.sendto

        class Capture:  # record what the client puts on the wire (for the replay test)
            def __getattr__(_, name):
                return getattr(sock, name)

            def sendto(_, data, addr):
                self.sent.append(bytes(data))
                return raw_send(data, addr)

        ep.sock = Capture()  # type: ignore[assignment]
        cfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(self.pki, "agent"), server_name="localhost")
        if use_ticket:
            cfg.session_ticket = self.cache.pop("localhost")
            cfg.token = self.token
        rec = Recorder()
        conn = ep.connect(("127.0.0.1", self.port), cfg, rec, session_ticket_handler=self.cache.add)
        conn.send_control(encode_control(Register(role=Role.AGENT, service_id="echo")))
        await asyncio.wait_for(rec.acked.wait(), 5)
        await asyncio.sleep(0.05)  # let the ticket and the token arrive
        self.token = rec.token() or self.token
        return ep, conn


async def _server(pki, store: ServerTicketStore, tmp_path) -> Intermediate:
    srv = Intermediate(IntermediateOptions(
        tls=TlsFiles.from_dir(pki, "intermediate"), listen=[("127.0.0.1", 0)], metrics=None,
        ticket_store=store, state_dir=str(tmp_path),
    ))
    await srv.start()
    return srv


def test_reconnect_uses_0rtt_and_tickets_are_private(pki, tmp_path):
    async def main():
        store = ServerTicketStore(tmp_path / "tickets.sqlite")
        srv = await _server(pki, store, tmp_path)
        client = Client(pki, srv.ports[0], ClientTicketCache(tmp_path / "agent"))
        ep, first = await client.connect()
        assert not first.resumed
        first.close()
        ep2, second = await client.connect()
        assert second.resumed and second.early_data_accepted
        assert store.stats.resumed == 1
        assert ep2.stats.retry_sent == 0
        from prometheus_client import generate_latest

        metrics = generate_latest(srv._metrics_registry()).decode()
        assert "ztna_zero_rtt_resumptions_total 1.0" in metrics
        await srv.stop()

    asyncio.run(main())
    for f in list((tmp_path / "agent").iterdir()) + [tmp_path / "tickets.sqlite", tmp_path / "address-token.key"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_replayed_early_flight_has_no_second_effect(pki, tmp_path):
    async def main():
        store = ServerTicketStore(tmp_path / "tickets.sqlite")
        srv = await _server(pki, store, tmp_path)
        client = Client(pki, srv.ports[0], ClientTicketCache(tmp_path / "agent"))
        ep, conn = await client.connect()
        conn.close()
        await asyncio.sleep(0.05)
        client.sent.clear()
        ep2, conn2 = await client.connect()
        assert conn2.early_data_accepted
        first_flight = list(client.sent[:2])  # Initial (ClientHello) + 0-RTT with the Register
        # Close the real connection first, so its connection IDs no longer route anywhere and
        # the replay must stand on its own (ticket lookup → strike register).
        conn2.close()
        await asyncio.sleep(0.2)
        registrations = srv.registry.registrations
        peers = len(srv.conns)
        # An attacker replays the captured early flight from another socket.
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(3):
            for datagram in first_flight:
                attacker.sendto(datagram, ("127.0.0.1", srv.ports[0]))
            await asyncio.sleep(0.1)
        attacker.close()
        await asyncio.sleep(0.3)
        assert srv.registry.registrations == registrations
        assert len(srv.conns) == peers
        assert store.stats.resumed == 1  # the ticket was single use
        assert store.stats.refused_unknown >= 1  # the replay asked for it again and was refused
        await srv.stop()

    asyncio.run(main())


def test_rotated_ticket_falls_back_to_full_handshake(pki, tmp_path):
    async def main():
        store = ServerTicketStore(tmp_path / "tickets.sqlite")
        srv = await _server(pki, store, tmp_path)
        client = Client(pki, srv.ports[0], ClientTicketCache(tmp_path / "agent"))
        ep, conn = await client.connect()
        conn.close()
        store.rotate()
        store.rotate()
        ep2, conn2 = await client.connect()
        assert not conn2.resumed and conn2.identity is None  # full handshake, still registered
        assert store.stats.refused_rotated + store.stats.refused_unknown >= 1
        await srv.stop()

    asyncio.run(main())


def test_separate_stores_never_accept_each_others_tickets(pki, tmp_path):
    async def main():
        srv_a = await _server(pki, ServerTicketStore(tmp_path / "a.sqlite"), tmp_path / "a")
        srv_b = await _server(pki, ServerTicketStore(tmp_path / "b.sqlite"), tmp_path / "b")
        cache = ClientTicketCache(tmp_path / "agent")
        ep, conn = await Client(pki, srv_a.ports[0], cache).connect()
        conn.close()
        ep2, conn2 = await Client(pki, srv_b.ports[0], cache).connect()
        assert not conn2.resumed
        await srv_a.stop()
        await srv_b.stop()

    asyncio.run(main())


def test_restarted_intermediate_resumes_from_its_state_dir(pki, tmp_path):
    async def main():
        srv = await _server(pki, ServerTicketStore(tmp_path / "tickets.sqlite"), tmp_path)
        port = srv.ports[0]
        client = Client(pki, port, ClientTicketCache(tmp_path / "agent"))
        ep, conn = await client.connect()
        await srv.stop()
        srv2 = Intermediate(IntermediateOptions(
            tls=TlsFiles.from_dir(pki, "intermediate"), listen=[("127.0.0.1", port)], metrics=None,
            ticket_store=ServerTicketStore(tmp_path / "tickets.sqlite"), state_dir=str(tmp_path),
        ))
        await srv2.start()
        ep2, conn2 = await client.connect()
        assert conn2.resumed and conn2.early_data_accepted
        await srv2.stop()

    asyncio.run(main())


def test_stale_address_token_and_ticket_fall_back_to_retry_and_full_handshake(pki, tmp_path):
    """An Agent's saved token and ticket from a previous Intermediate without a state dir
    must not wedge the handshake: the new server sends a Retry and does a full handshake."""

    async def main():
        srv = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(pki, "intermediate"),
                                               listen=[("127.0.0.1", 0)], metrics=None))
        await srv.start()
        port = srv.ports[0]
        client = Client(pki, port, ClientTicketCache(tmp_path / "agent"))
        await client.connect()
        assert client.token
        await srv.stop()
        fresh = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(pki, "intermediate"),
                                                 listen=[("127.0.0.1", port)], metrics=None))
        await fresh.start()
        ep, conn = await client.connect()
        assert not conn.resumed
        stats = fresh.endpoints[0].stats
        assert stats.address_tokens_invalid == 1 and stats.retry_sent == 1
        await fresh.stop()

    asyncio.run(main())
