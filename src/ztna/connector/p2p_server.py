"""The Connector's P2P QUIC server: direct connections from Agents on their own UDP socket.

* Its own socket (default UDP 4434, separate from the relay socket), so dropping P2P traffic
  never touches the relay and a NAT mapping learnt here belongs to this socket.
* mTLS: the Agent's chain is verified by the endpoint; every service is checked against the
  Agent's certificate (`identity.allows("agent", service)`) before a DATAGRAM or a
  stream is served. DATAGRAMs are 0x2F (service id + IP packet); replies are bare IP packets
  on the same connection (a `ReplyPath` without a prefix). Streams start with `StreamOpen`.
* Agent id: the Agent's first control frame is `Hello(instance)`; the id is derived exactly
  as the Intermediate does (`ztna.identity.stable_peer_id`), so flows are shared with the
  relay path (`ztna.connector.paths`). DATAGRAMs that overtake the Hello (other packets,
  0-RTT) wait in a small buffer; without a Hello a connection gets no flows.
* No Retry: the Agent's address was already validated by the authenticated probes (and the
  per-source handshake rate limit stays) — one round trip less to the direct path. Session
  tickets (`ServerTicketStore`, in memory or `<state_dir>/p2p-tickets.sqlite`) let an Agent
  that comes back (re-punch after a cooldown, restart) send Hello, registrations and its
  first packets in 0-RTT.
* The socket is a `ztna.p2p_socket.P2PSocket`, the same component the Agent uses: it keeps
  the QAD connection from this socket to the Intermediate (its `public_address`), follows
  the relay link when that fails over to another Intermediate (`follow`), refreshes the
  interface addresses and routes probes, all on one timer. Hole punching
  (`ztna.connector.punch.ConnectorPunch`, made here) hears those events and probes through
  `send_raw`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ztna.connector.paths import ReplyPath
from ztna.connector.punch import LINGER, MAX_SESSIONS, ConnectorPunch
from ztna.connector.relay_link import BACKOFF_BASE, BACKOFF_CAP
from ztna.connector.state import ConnectorStats, ServiceState
from ztna.connector.streams import StreamTable
from ztna.early import EarlyHold
from ztna.errors import DecodeError
from ztna.identity import ChainVerifier, load_ca_file, stable_peer_id
from ztna.link import Backoff
from ztna.observe import format_address
from ztna.p2p_socket import P2PSocket
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, ServerOptions, bind_udp, normalize_address
from ztna.revocation_guard import RevocationGuard
from ztna.startup import bind_error
from ztna.wire import (
    SERVICE_DATAGRAM,
    ControlMessage,
    Hello,
    NackStatus,
    ObservedAddress,
    Register,
    RegistrationAck,
    RegistrationNack,
    Role,
    ServiceHealth,
    decode_service_datagram,
    encode_control,
)


class ConnectorSink(Protocol):
    """What the P2P server hands to the Connector (``ztna.connector.service.Connector``):
    direct paths coming up and going down, authorized tunnel packets, stream events, and
    the counters it bumps. A Protocol, so that this module does not import the Connector."""

    @property
    def stats(self) -> ConnectorStats: ...
    @property
    def services(self) -> Mapping[str, ServiceState]: ...
    @property
    def streams(self) -> StreamTable: ...
    @property
    def revocation(self) -> RevocationGuard: ...
    def direct_up(self, path: ReplyPath) -> None: ...
    def path_down(self, path: ReplyPath, *, park: bool = False) -> None: ...
    def on_packet(self, path: ReplyPath, service_id: str, packet: memoryview) -> None: ...
    def health_message(self, service: str) -> ServiceHealth: ...
    def punch_ms_for(self, addr: tuple[Any, ...]) -> float | None: ...

PRE_HELLO_BUFFER = 64     # DATAGRAMs kept while a direct connection's Hello is on its way

log = logging.getLogger("ztna.connector")


class _DirectHandler(ConnectionHandler):
    __slots__ = ("server", "allowed", "pending", "instance", "handshake_at")

    def __init__(self, server: P2PServer) -> None:
        self.server = server
        self.allowed: dict[str, bool] = {}
        # Packets that overtook the Hello; released (and no more kept) once it arrived.
        self.pending: EarlyHold[tuple[str, bytes]] = EarlyHold(PRE_HELLO_BUFFER)
        self.instance: int | None = None     # a Hello heard before the peer was verified
        self.handshake_at: float | None = None

    def path(self, conn: ZtnaConnection) -> ReplyPath | None:
        """The connection's reply path; made on first use (0-RTT data precedes on_handshake),
        only once the peer is authenticated (a resumed session carries its identity)."""
        path = conn.user
        if path is None and conn.identity is not None and not conn.closed:
            ident = conn.identity.common_name
            conn.label = f"{ident}@{normalize_address(conn.peer_address)[0]}"
            path = conn.user = ReplyPath(conn, None, direct=True)
        return path

    def hello(self, conn: ZtnaConnection, instance: int) -> None:
        path = self.path(conn)
        if path is None:
            self.instance = instance
            return
        if path.agent_id is not None:
            return
        assert conn.identity is not None
        path.agent_id = stable_peer_id(conn.identity.fingerprint, instance)
        path.label = f"direct {conn.label}#{path.agent_id}"
        self.server.connector.direct_up(path)
        for service, packet in self.pending.release():
            self.server.connector.on_packet(path, service, memoryview(packet))

    def allows(self, conn: ZtnaConnection, service: str) -> bool:
        ok = self.allowed.get(service)
        if ok is None:
            ident = conn.identity
            ok = (ident is not None and service in self.server.connector.services
                  and ident.allows("agent", service))
            if len(self.allowed) < 256:
                self.allowed[service] = ok
        return ok

    def on_handshake(self, conn: ZtnaConnection) -> None:
        path = self.path(conn)
        now = asyncio.get_running_loop().time()
        self.handshake_at = now
        if path is not None:
            path.setup["handshake_ms"] = (now - conn.created_at) * 1000
            path.setup["punch_ms"] = self.server.connector.punch_ms_for(normalize_address(conn.peer_address))
        if self.instance is not None:
            self.hello(conn, self.instance)
        log.info("direct connection from agent %s%s", conn.label,
                 " (resumed, 0-RTT)" if conn.early_data_accepted else " (resumed)" if conn.resumed else "")
        host, port = normalize_address(conn.peer_address)
        conn.send_control(encode_control(ObservedAddress(ip=host.split("%")[0], port=port)))
        self.server.connections += 1

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        if isinstance(msg, Hello):
            self.hello(conn, msg.instance)
        elif isinstance(msg, Register):
            if msg.role is Role.AGENT and self.allows(conn, msg.service_id):
                reply: RegistrationAck | RegistrationNack = RegistrationAck(service_id=msg.service_id)
            else:
                reply = RegistrationNack(service_id=msg.service_id,
                                         status=NackStatus.NOT_AUTHORIZED)
            conn.send_control(encode_control(reply))
            if isinstance(reply, RegistrationAck):
                path = self.path(conn)
                if path is not None and "registration_ms" not in path.setup:
                    # 0-RTT: the registration came with the handshake.
                    since = self.handshake_at if self.handshake_at is not None else conn.created_at
                    path.setup["registration_ms"] = max(0.0, asyncio.get_running_loop().time() - since) * 1000
                # The Agent learns our backend's health on this path too, so it can
                # leave a direct path to an unhealthy backend (docs/agent.md).
                self.server.registered.setdefault(conn, set()).add(msg.service_id)
                conn.send_control(encode_control(self.server.connector.health_message(msg.service_id)))

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        path = self.path(conn)
        if path is None or not data or data[0] != SERVICE_DATAGRAM:
            self.server.connector.stats.malformed += 1
            return
        try:
            service, packet = decode_service_datagram(data)
        except DecodeError:
            self.server.connector.stats.malformed += 1
            return
        if not self.allows(conn, service):
            self.server.connector.stats.not_authorized += 1
            return
        if path.agent_id is None:
            # Overtook the Hello (no flow may exist without an agent id): keep it briefly.
            self.pending.hold((service, bytes(packet)))
            return
        self.server.connector.on_packet(path, service, packet)

    def on_stream_data(self, conn: ZtnaConnection, stream_id: int, data: bytes, end: bool) -> None:
        if self.path(conn) is None:
            conn.reset_stream(stream_id)
            return
        self.server.connector.streams.on_stream_data(
            conn, stream_id, data, end, authorize=lambda s: self.allows(conn, s))

    def on_stream_reset(self, conn: ZtnaConnection, stream_id: int, error_code: int) -> None:
        self.server.connector.streams.on_stream_reset(conn, stream_id)

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None:
        path = conn.user
        self.pending.release()
        self.server.registered.pop(conn, None)
        if isinstance(path, ReplyPath):
            log.info("direct connection %s closed: %s", conn.label, reason)
            self.server.connector.path_down(path)
        self.server.connector.streams.drop_conn(conn)


class P2PServer:
    def __init__(self, connector: ConnectorSink, *, host: str, port: int, tls: TlsFiles,
                 udp_payload: int, intermediate: Callable[[], tuple[str, int]], server_name: str | None,
                 rng: random.Random | None = None, ticket_path: str | None = None) -> None:
        self.connector = connector
        self.host = host
        self.port = port
        self.tls = tls
        self.udp_payload = udp_payload
        self.intermediate = intermediate   # the Intermediate the relay link is on now
        self.server_name = server_name      # None: each Intermediate's own host name
        self.rng = rng or random.Random()
        self.sock: P2PSocket[None] | None = None
        self.connections = 0
        # Direct connections -> the services they registered (for health reports).
        self.registered: dict[ZtnaConnection, set[str]] = {}
        from ztna.quic.tickets import ServerTicketStore

        self.ticket_store = ServerTicketStore(ticket_path)
        # Hole punching on this socket: the socket's events (public address, interfaces,
        # probes) go to it, the relay link's punch signaling too (wired by the Connector).
        self.punch = ConnectorPunch(self, relay_address=intermediate)

    def start(self) -> None:
        config = make_configuration(is_client=False, tls=self.tls, udp_payload=self.udp_payload)
        options = ServerOptions(
            configuration=config,
            handler_factory=lambda: _DirectHandler(self),
            verifier=ChainVerifier(load_ca_file(self.tls.ca)),
            retry=False,                       # probes validated the address already
            ticket_store=self.ticket_store,    # resumption + 0-RTT for returning Agents
            admit=self.connector.revocation.admit,
        )
        try:
            sock = bind_udp(self.host, self.port)
        except OSError as exc:
            raise bind_error("Connector P2P port", "udp", self.host, self.port, exc) from None

        def qad_config(host: str) -> Any:
            return make_configuration(is_client=True, tls=self.tls,
                                      server_name=self.server_name or host,
                                      udp_payload=self.udp_payload)

        self.sock = P2PSocket(sock, self.punch, intermediate=self.intermediate, qad_config=qad_config,
                              backoff=Backoff(initial=BACKOFF_BASE, cap=BACKOFF_CAP, rng=self.rng),
                              max_sessions=MAX_SESSIONS, linger=LINGER, server=options)
        log.info("P2P QUIC server on udp %s", format_address((self.host, self.local_port)))
        self.sock.start()

    @property
    def endpoint(self) -> QuicEndpoint | None:
        return self.sock.endpoint if self.sock is not None else None

    @property
    def local_port(self) -> int:
        assert self.sock is not None
        return self.sock.port

    @property
    def public_address(self) -> ObservedAddress | None:
        return self.sock.public_address if self.sock is not None else None

    def follow(self) -> None:
        """The relay link moved to another Intermediate (a failover): QAD goes there now;
        the relay candidate is read from the link whenever candidates are gathered."""
        if self.sock is not None:
            self.sock.follow()

    def send_to_registered(self, service: str, frame: bytes) -> None:
        """Send a control frame to every direct connection registered for `service`."""
        for conn, services in list(self.registered.items()):
            if service in services and not conn.closed:
                conn.send_control(frame)

    def send_raw(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        """Send a non-QUIC datagram (a probe) from the P2P socket."""
        return self.sock is not None and self.sock.send_raw(data, addr)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(reason="connector shutting down")

    def shutdown_socket(self) -> None:
        if self.sock is not None:
            self.sock.shutdown_socket()
        self.ticket_store.close()
