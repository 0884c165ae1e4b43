"""0-RTT reconnection and its replay protection, with a real Intermediate on loopback."""

from __future__ import annotations

import asyncio
import socket
import stat
import sys
from pathlib import Path

import pytest

from ztna.certs import init_pki
from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.quic.config import TlsFiles, forget_client_sessions, make_configuration
from ztna.quic.connection import ConnectionHandler
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.quic.tickets import ServerTicketStore
from ztna.wire import (
    AddressToken,
    Register,
    RegistrationAck,
    Role,
    encode_control,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "intermediate"))
from intermediate_helpers import Forwarder  # noqa: E402


class Recorder(ConnectionHandler):
    def __init__(self) -> None:
        self.messages: list[object] = []
        self.acked = asyncio.Event()

    def on_message(self, conn, msg):
        self.messages.append(msg)
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
    """Connects, registers as agent for 'echo'. Tickets and address tokens live in the
    process's native client configuration (one per identity), as in the Agent."""

    def __init__(self, pki, port: int) -> None:
        self.pki, self.port = pki, port
        self.hops: list[Forwarder] = []

    async def connect(self, *, use_ticket: bool = True, via_hop: bool = False):
        port = self.port
        if via_hop:
            hop = Forwarder(self.port)
            port = await hop.start()
            self.hops.append(hop)
        sock = bind_udp("127.0.0.1", 0)
        ep = QuicEndpoint(sock)
        cfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(self.pki, "agent"), server_name="localhost")
        cfg.resumption = use_ticket
        rec = Recorder()
        conn = ep.connect(("127.0.0.1", port), cfg, rec)
        conn.send_control(encode_control(Register(role=Role.AGENT, service_id="echo")))
        await asyncio.wait_for(rec.acked.wait(), 5)
        await asyncio.sleep(0.05)  # let the tickets and the address token arrive
        return ep, conn


@pytest.fixture(autouse=True)
def fresh_client_sessions():
    """Each test starts without tickets from another test's servers."""
    forget_client_sessions()
    yield
    forget_client_sessions()


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
        client = Client(pki, srv.ports[0])
        ep, first = await client.connect()
        assert not first.resumed
        first.close()
        ep2, second = await client.connect()
        assert second.resumed and second.early_data_accepted
        assert store.stats.resumed == 1
        assert ep2.stats.retry_sent == 0
        from prometheus_client import generate_latest

        metrics = generate_latest(srv.metrics_registry()).decode()
        assert "ztna_zero_rtt_resumptions_total 1.0" in metrics
        await srv.stop()

    asyncio.run(main())
    for f in [tmp_path / "tickets.sqlite", tmp_path / "address-token.key"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_replayed_early_flight_has_no_second_effect(pki, tmp_path):
    async def main():
        store = ServerTicketStore(tmp_path / "tickets.sqlite")
        srv = await _server(pki, store, tmp_path)
        client = Client(pki, srv.ports[0])
        ep, conn = await client.connect()
        conn.close()
        await asyncio.sleep(0.05)
        ep2, conn2 = await client.connect(via_hop=True)
        assert conn2.early_data_accepted
        # What the client sent before the server's first answer: Initial (ClientHello with
        # the ticket) + 0-RTT with the Register.
        first_flight = list(client.hops[-1].first_flight)
        assert first_flight
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
        for hop in client.hops:
            hop.close()
        assert srv.registry.registrations == registrations
        assert len(srv.conns) == peers
        assert store.stats.resumed == 1  # the ticket was single use
        # The replay was stopped before it could have an effect: either its address token was
        # seen before (quinn's token log: the attacker gets a Retry it cannot answer with the
        # captured flight) or the strike register no longer had its ticket.
        retries = srv.endpoints[0].stats.retry_sent
        assert store.stats.refused_unknown >= 1 or retries >= 1, (store.stats, retries)
        await srv.stop()

    asyncio.run(main())


def test_rotated_ticket_falls_back_to_full_handshake(pki, tmp_path):
    async def main():
        store = ServerTicketStore(tmp_path / "tickets.sqlite")
        srv = await _server(pki, store, tmp_path)
        client = Client(pki, srv.ports[0])
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
        ep, conn = await Client(pki, srv_a.ports[0]).connect()
        conn.close()
        ep2, conn2 = await Client(pki, srv_b.ports[0]).connect()
        assert not conn2.resumed
        await srv_a.stop()
        await srv_b.stop()

    asyncio.run(main())


def test_restarted_intermediate_resumes_from_its_state_dir(pki, tmp_path):
    async def main():
        srv = await _server(pki, ServerTicketStore(tmp_path / "tickets.sqlite"), tmp_path)
        port = srv.ports[0]
        client = Client(pki, port)
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
    """A client's token and ticket from a previous Intermediate without a state dir must not
    wedge the handshake: the new server sends a Retry and does a full handshake."""

    async def main():
        srv = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(pki, "intermediate"),
                                               listen=[("127.0.0.1", 0)], metrics=None))
        await srv.start()
        port = srv.ports[0]
        client = Client(pki, port)
        ep0, conn0 = await client.connect()
        assert not conn0.resumed
        await srv.stop()
        fresh = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(pki, "intermediate"),
                                                 listen=[("127.0.0.1", port)], metrics=None))
        await fresh.start()
        ep, conn = await client.connect()
        assert not conn.resumed
        stats = fresh.endpoints[0].stats
        # The old server's address token does not validate here: a Retry, no resumption.
        assert stats.retry_sent == 1 and stats.address_tokens_validated == 0
        await fresh.stop()

    asyncio.run(main())
