"""The Intermediate: asyncio driver around the registry, the relay and the signaling core.

Per connection: on handshake it gets a peer id and its QAD (DATAGRAM 0x01 + control frame),
re-sent whenever its address changes. Control frames (stream 0) carry registration and
signaling; DATAGRAMs carry tunnel traffic (0x2F from Agents → 0x30 to a Connector; 0x31
from Connectors → the bare IP packet to exactly that Agent). TCP-carrying streams are
spliced by `ztna.intermediate.streams`.

No decision lives here that the pure cores can make; this module moves bytes and counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from ztna import limits
from ztna.errors import DatagramTooLarge, DecodeError, ProtocolError
from ztna.identity import ChainVerifier, certificate_names, load_ca_file, stable_peer_id
from ztna.intermediate.admin.snapshot import ConnectionView, LatencyHistogram, Snapshot
from ztna.intermediate.registry import AllowAll, Notify, Registry
from ztna.observe import MetricsServer, RateLimitedLog, StatsCollector, format_address
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import (
    CLOSE_AUTH,
    CLOSE_SHUTDOWN,
    QuicEndpoint,
    ServerOptions,
    bind_udp,
    normalize_address,
)
from ztna.revocation_guard import RevocationGuard
from ztna.startup import bind_error
from ztna.wire import (
    FROM_CONNECTOR,
    PUNCH_MESSAGES,
    SERVICE_DATAGRAM,
    AddressToken,
    AgentGone,
    ControlMessage,
    GoAway,
    Hello,
    MeshSignal,
    ObservedAddress,
    Register,
    RegistrationNack,
    ServiceHealth,
    StandingCandidates,
    decode_from_connector,
    decode_registration,
    decode_service_datagram,
    encode_control,
    encode_qad,
    encode_registration,
    to_connector_from_service_datagram,
)
from ztna.wire.mesh import MESH_FROM_CONNECTOR, MESH_TO_CONNECTOR
from ztna.wire.registration import REGISTER_AGENT, REGISTER_CONNECTOR

log = logging.getLogger("ztna.intermediate")

# ("agent", endpoint, agent handle, service id, connector handle, agent id) or
# ("reply", endpoint, connector handle, agent id, agent handle).
_Route = tuple[Any, ...]


@dataclass
class IntermediateOptions:
    tls: TlsFiles
    listen: list[tuple[str, int]] = field(default_factory=lambda: [("::", limits.INTERMEDIATE_PORT)])
    metrics: tuple[str, int] | None = ("127.0.0.1", limits.INTERMEDIATE_METRICS_PORT)
    retry: bool = True
    insecure_no_client_auth: bool = False
    insecure_allow_unscoped: bool = False
    udp_payload: int = limits.DEFAULT_QUIC_UDP_PAYLOAD
    max_connections: int = limits.MAX_CONNECTIONS
    handshakes_per_source_per_second: float = limits.HANDSHAKES_PER_SOURCE_PER_SECOND
    max_registrations: int = limits.MAX_REGISTRATIONS_PER_CONNECTION
    keylog: str | None = None
    qlog_dir: str | None = None
    drain_seconds: float = 1.0
    ticket_store: Any = None        # a ztna.quic.tickets.ServerTicketStore; built from state_dir if None
    state_dir: str | None = None    # holds tickets.sqlite (shared strike register for 0-RTT)
    enable_0rtt: bool = True
    cluster: str | None = None      # redis://HOST:PORT/DB: share keys and tickets with other members
    advertise: str | None = None    # HOST:PORT the other members know this one by
    # The certificate this member dials the others with (SAN intermediate.ztna); None:
    # member.pem/.key next to the server certificate, if they are there (else no mesh).
    mesh_tls: TlsFiles | None = None
    revoked: str | None = None      # deny-list file (ztna.revocation), reloaded on SIGHUP
    admin: tuple[str, int] | None = None    # admin API and dashboard (off by default)
    admin_token: bytes | None = None        # enables the write operations; needed off loopback
    audit_log: str | None = None    # per-flow audit log of relayed TCP streams (ztna.audit)
    audit_log_max_bytes: int = 10 * 1024 * 1024
    audit_log_backups: int = 5
    audit_interval: float = 300.0   # seconds between interim lines of a long flow


@dataclass
class RelayStats:
    relayed_datagrams: int = 0
    relayed_bytes: int = 0
    dropped_unregistered: int = 0
    dropped_no_connector: int = 0
    dropped_bad_reply: int = 0
    dropped_oversize: int = 0
    dropped_malformed: int = 0
    dropped_unknown_type: int = 0
    held_until_registered: int = 0
    control_errors: int = 0


class Intermediate:
    def __init__(self, options: IntermediateOptions) -> None:
        self.options = options
        self.registry = Registry(max_registrations=options.max_registrations)
        self.stats = RelayStats()
        self.conns: dict[int, ZtnaConnection] = {}
        self.endpoints: list[QuicEndpoint] = []
        self.metrics_server: MetricsServer | None = None
        self.draining = False
        self.ready = False
        self._next_peer = 1
        self._bad = RateLimitedLog(log)
        self._stopped = asyncio.Event()
        self.signaling: Any = None
        self.streams: Any = None
        self._server_options: ServerOptions | None = None
        self.started_at = 0.0
        self.address_tokens: Any = None
        self.audit: Any = None          # a ztna.audit.AuditLog with --audit-log
        # Per connection: how its setup went, in ms (handshake, first registration), for
        # the audit lines of its flows.
        self.setup_times: dict[ZtnaConnection, dict[str, float | None]] = {}
        self._instances: dict[int, tuple[str, int]] = {}
        self._held: dict[ZtnaConnection, list[bytes]] = {}
        self._control_handlers = self._control_table()
        # Native relay routes installed, per (service, agent id) (what `_routes_for` derived),
        # the agents routed per service, and a count per route (a reply route may be
        # justified by several services).
        self._routes: dict[tuple[str, int], frozenset[_Route]] = {}
        self._routed: dict[str, set[int]] = {}
        self._route_refs: dict[_Route, int] = {}
        self.cluster: Any = None        # a ztna.cluster.member.ClusterMember with --cluster
        self.mesh: Any = None           # its ztna.cluster.mesh.Mesh, with a member certificate
        self.revocation = RevocationGuard(options.revoked, close_code=CLOSE_AUTH)
        self.handshakes = LatencyHistogram()
        self.admin_server: Any = None
        # peer id -> its certificate's SANs: parsed once per connection, not per admin read.
        self._sans: dict[int, tuple[str, ...]] = {}

    # ------------------------------------------------------------------ lifecycle
    def _build_server_options(self) -> ServerOptions:
        o = self.options
        if self.cluster is not None:
            self._use_cluster_state()
        if o.ticket_store is None and o.enable_0rtt:
            from ztna.quic.tickets import ServerTicketStore

            path = Path(o.state_dir) / "tickets.sqlite" if o.state_dir else None
            o.ticket_store = ServerTicketStore(path)
        if self.address_tokens is None:
            from ztna.quic.tokens import AddressTokens

            self.address_tokens = AddressTokens.from_state_dir(o.state_dir)
        config = make_configuration(
            is_client=False, tls=o.tls, udp_payload=o.udp_payload,
            keylog_path=o.keylog, qlog_dir=o.qlog_dir,
        )
        verifier = None if o.insecure_no_client_auth else ChainVerifier(load_ca_file(o.tls.ca))
        return ServerOptions(
            configuration=config,
            handler_factory=lambda: _PeerHandler(self),
            verifier=verifier,
            retry=o.retry,
            max_connections=o.max_connections,
            handshakes_per_source_per_second=o.handshakes_per_source_per_second,
            ticket_store=o.ticket_store,
            address_tokens=self.address_tokens,
            admit=self.revocation.admit,
            # Derived from the server key, so a restarted Intermediate resets its
            # predecessor's connections and clients reconnect at once (not after 30 s).
            # (TlsFiles.key is None only for a client that presents no certificate)
            reset_secret=self.cluster.reset_key if self.cluster is not None else
            hashlib.sha256(b"ztna stateless reset v1"
                           + Path(o.tls.key).read_bytes()).digest(),  # type: ignore[arg-type]
        )

    def _presence(self) -> Any:
        """What this member holds, for the cluster's presence records."""
        from ztna.cluster.presence import Presence

        peers = self.registry.peers
        return Presence(
            self.options.advertise or "",
            {s: tuple(peers[c].label for c in pool if c in peers)
             for s, pool in self.registry.connectors.items()},
            {s: len(agents) for s, agents in self.registry.agents.items()},
        )

    def _start_mesh(self) -> None:
        o = self.options
        tls = o.mesh_tls
        if tls is None and o.tls.cert is not None:
            d = Path(o.tls.cert).parent
            if (d / "member.pem").exists() and (d / "member.key").exists():
                tls = TlsFiles(cert=d / "member.pem", key=d / "member.key", ca=o.tls.ca)
        if tls is None:
            log.warning("no member certificate (member.pem/.key beside the server certificate):"
                        " the mesh is off, Agents reach only Connectors on this member")
            return
        from ztna.cluster.mesh import Mesh

        self.mesh = Mesh(self, self.cluster, tls, udp_payload=o.udp_payload)
        self.cluster.on_view = self.mesh.maintain

    def new_peer_id(self) -> int:
        """A peer id in use by no connection and no registry entry (remote Agents have one)."""
        peer_id = self._next_peer
        while peer_id in self.conns or peer_id in self.registry.peers:
            peer_id = (peer_id % 0xFFFFFFFF) + 1
        self._next_peer = (peer_id % 0xFFFFFFFF) + 1
        return peer_id

    def _use_cluster_state(self) -> None:
        # Keys and tickets shared by every member, so a client moving between members keeps
        # its address token and resumes in 0-RTT (ztna.cluster).
        from ztna.quic.tokens import AddressTokens

        if self.options.enable_0rtt:
            self.options.ticket_store = self.cluster.tickets
        self.address_tokens = AddressTokens(self.cluster.address_token_key)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        if self.options.cluster and self.cluster is None:
            from ztna.cluster.member import ClusterMember

            self.cluster = ClusterMember(self.options.cluster, self.options.advertise or "",
                                         local_presence=self._presence)
            await self.cluster.join()
            self.cluster.start()
            self._start_mesh()
        self._server_options = self._build_server_options()
        for host, port in self.options.listen:
            try:
                sock = bind_udp(host, port)
            except OSError as exc:
                raise bind_error("Intermediate listen address", "udp", host, port, exc) from None
            self.endpoints.append(QuicEndpoint(sock, server=self._server_options, loop=loop))
            log.info("listening on udp %s", format_address((host, sock.getsockname()[1])))
        try:
            from ztna.intermediate.signaling import Signaling

            self.signaling = Signaling(rng=secrets.token_bytes)
        except ImportError:
            self.signaling = None
        try:
            from ztna.intermediate.streams import StreamSplicer

            self.streams = StreamSplicer(self)
        except ImportError:
            self.streams = None
        if self.options.audit_log is not None:
            from ztna.audit import AuditLog
            from ztna.errors import UsageError

            try:
                self.audit = AuditLog(self.options.audit_log, process="intermediate",
                                      max_bytes=self.options.audit_log_max_bytes,
                                      backups=self.options.audit_log_backups,
                                      interval=self.options.audit_interval)
            except OSError as exc:
                raise UsageError(f"cannot open the audit log {self.options.audit_log!r}: "
                                 f"{exc.strerror or exc}") from None
            if self.streams is not None:
                splicer = self.streams
                self.audit.start(splicer.live_audits)
        if self.options.metrics is not None:
            self.metrics_server = MetricsServer(self._metrics_registry(), self._health)
            await self.metrics_server.start(*self.options.metrics)
            log.info("metrics on http://%s/metrics", format_address((self.options.metrics[0], self.metrics_server.port)))
        if self.options.admin is not None:
            from ztna.intermediate.admin.http import AdminServer, is_loopback

            host, port = self.options.admin
            self.admin_server = AdminServer(self, token=self.options.admin_token,
                                            reads_need_token=not is_loopback(host))
            try:
                await self.admin_server.start(host, port)
            except OSError as exc:
                raise bind_error("admin API address", "tcp", host, port, exc) from None
            log.info("admin API and dashboard on http://%s/", format_address((host, self.admin_server.port)))
        self.ready = True

    @property
    def ports(self) -> list[int]:
        return [ep.local_address[1] for ep in self.endpoints]

    def reload_certificates(self) -> None:
        try:
            new = self._build_server_options()
        except Exception as exc:  # keep serving with the old certificates
            log.error("certificate reload failed, keeping the old ones: %s", exc)
            return
        assert self._server_options is not None
        self._server_options.configuration = new.configuration
        self._server_options.verifier = new.verifier
        self._server_options.reload_tls()
        for ep in self.endpoints:
            ep.server_config_changed()
        log.info("certificates reloaded (new connections use them)")

    def reload(self) -> None:
        """SIGHUP: the certificate files and the revocation list; a revoked peer's live
        connections are closed at once (and its registrations go with them)."""
        self.reload_certificates()
        if self.revocation.reload():
            self.revocation.sweep(self.conns.values())

    async def stop(self) -> None:
        """Graceful drain: tell every peer, close, give the close a moment to leave."""
        if self.draining:
            return
        self.draining = True
        log.info("draining %d connections", len(self.conns))
        frame = encode_control(GoAway(reason="server shutting down"))
        for conn in list(self.conns.values()):
            conn.send_control(frame)
        for ep in self.endpoints:
            ep.close(error_code=CLOSE_SHUTDOWN, reason="server shutting down")
        await asyncio.sleep(min(self.options.drain_seconds, 0.2 if not self.conns else self.options.drain_seconds))
        for ep in self.endpoints:
            ep.shutdown_socket()
        if self.metrics_server:
            await self.metrics_server.close()
        if self.mesh is not None:
            self.mesh.close()
        if self.cluster is not None:
            await self.cluster.close()
        if self.admin_server is not None:
            await self.admin_server.close()
        if self.audit is not None:
            if self.streams is not None:
                self.streams.close_all("shutdown")
            self.audit.close()
        self._stopped.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        await self.start()
        await self._stopped.wait()

    # ------------------------------------------------------------------ peers
    def peer_up(self, conn: ZtnaConnection) -> None:
        self.handshakes.observe(asyncio.get_running_loop().time() - conn.created_at)
        identity = conn.identity
        if identity is not None and identity.intermediate and self.mesh is not None:
            self.mesh.member_up(conn)   # another member of the cluster: a mesh peer only
            return
        peer_id = self.new_peer_id()    # stable ids (Hello) live in the same space
        conn.user = peer_id
        if identity is not None and not identity.scoped:
            if not self.options.insecure_allow_unscoped:
                log.warning("refusing %s: certificate %r has no ztna service SAN",
                            format_address(conn.peer_address), identity.common_name)
                conn.close(CLOSE_AUTH, "certificate has no ztna service SAN")
                return
            log.warning("%s: unscoped certificate allowed everything (--insecure-allow-unscoped-certs)", identity.common_name)
        # Without client-certificate checks (insecure flag) or with an unscoped certificate
        # in insecure mode, the peer may register anything; AllowAll.scoped is False, so it
        # can never join a service pool held by a scoped identity.
        auth = identity if identity is not None and identity.scoped else AllowAll()
        label = conn.identity.common_name if conn.identity is not None else "anonymous"
        conn.label = f"{label}#{peer_id}"
        self.registry.add_peer(peer_id, auth, conn.label)
        self.conns[peer_id] = conn
        self.setup_times[conn] = {"handshake_ms": (self._now() - conn.created_at) * 1000}
        host = normalize_address(conn.peer_address)[0]
        log.info("peer %s connected from %s%s", conn.label, format_address(conn.peer_address),
                 " (resumed, 0-RTT)" if conn.early_data_accepted or conn.resumed else "")
        self.send_qad(conn)
        if self.address_tokens is not None:
            token = self.address_tokens.issue(host)
            conn.send_control(encode_control(AddressToken(token=token.hex())))

    def peer_down(self, conn: ZtnaConnection, reason: str) -> None:
        if self.mesh is not None and self.mesh.member_down(conn):
            return
        peer_id = conn.user
        if peer_id is None or self.conns.get(peer_id) is not conn:
            return
        del self.conns[peer_id]
        self.setup_times.pop(conn, None)
        self._instances.pop(peer_id, None)
        self._sans.pop(peer_id, None)
        self._held.pop(conn, None)
        self.execute(self.registry.remove_peer(peer_id))
        if self.mesh is not None:
            self.mesh.agent_gone(peer_id)
        if self.signaling is not None:
            self.execute(self.signaling.peer_gone(peer_id))
        if self.streams is not None:
            self.streams.peer_gone(peer_id)
        log.info("peer %s disconnected: %s", conn.label, reason)

    def send_qad(self, conn: ZtnaConnection) -> None:
        host, port = normalize_address(conn.peer_address)
        addr = ObservedAddress(ip=host.split("%")[0], port=port)
        try:
            conn.send_datagram(encode_qad(addr))
        except DatagramTooLarge:
            pass
        conn.send_control(encode_control(addr))

    def execute(self, notes: list[Notify]) -> None:
        if self.mesh is not None and notes:
            notes = self.mesh.adjust(notes)
        for note in notes:
            conn = self.conns.get(note.peer)
            if conn is not None:
                conn.send_control(encode_control(note.message))
        # Every registry change (registration, departure) ends here: bring the native
        # routes in line with it before the next packet.
        self.sync_routes()
        if self.mesh is not None:
            self.mesh.sync_native()

    # ------------------------------------------------------------------ native relay routes
    # The relay decision is Python's (registry); where it is the same for every packet — an
    # Agent of a service with exactly one Connector, both on one native endpoint — it is
    # installed as routes and the native core forwards those DATAGRAMs without an event.
    # Everything else (several Connectors: a per-flow choice; IPv4 and IPv6 sockets; no
    # Connector; malformed) still comes here. A route only names what the registry allows:
    # the Agent's own connection → the service's Connector, and replies → that Agent id.
    def _routes_for(self, service: str, agent_id: int) -> frozenset[_Route]:
        connector_id = self.registry.sole_connector(service)
        connector = self.conns.get(connector_id) if connector_id is not None else None
        agent = self.conns.get(agent_id)
        if (connector is None or agent is None or connector.closed or agent.closed
                or agent is connector or agent.endpoint is not connector.endpoint
                or not self.registry.is_agent_of(agent_id, service)):
            return frozenset()
        ep = connector.endpoint
        return frozenset((("agent", ep, agent.handle, service.encode("ascii"), connector.handle, agent_id),
                          ("reply", ep, connector.handle, agent_id, agent.handle)))

    def sync_routes(self) -> None:
        changed = self.registry.take_changed()
        if not changed:
            return
        keys: set[tuple[str, int]] = set()
        for service, agent_id in changed:
            if agent_id is not None:
                keys.add((service, agent_id))
            else:  # the pool changed: every Agent of the service, routed or not
                keys.update((service, a) for a in self._routed.get(service, ()))
                keys.update((service, a) for a in self.registry.agents.get(service, ()))
        refs = self._route_refs
        gone: list[_Route] = []
        new: list[_Route] = []
        for key in keys:
            service, agent_id = key
            old = self._routes.pop(key, frozenset())
            want = self._routes_for(service, agent_id)
            routed = self._routed.setdefault(service, set())
            if want:
                self._routes[key] = want
                routed.add(agent_id)
            else:
                routed.discard(agent_id)
                if not routed:
                    del self._routed[service]
            for route in old - want:
                refs[route] -= 1
                if not refs[route]:
                    del refs[route]
                    gone.append(route)
            for route in want - old:
                refs[route] = refs.get(route, 0) + 1
                if refs[route] == 1:
                    new.append(route)
        # Removals first: a new route may reuse the key (connector, agent id) of a gone one.
        for route in gone:
            native = route[1].native
            if route[0] == "agent":
                native.unroute_agent(route[2], route[3])
            else:
                native.unroute_reply(route[2], route[3])
        for route in new:
            native = route[1].native
            if route[0] == "agent":
                native.route_agent(route[2], route[3], route[4], route[5])
            else:
                native.route_reply(route[2], route[3], route[4])

    # ------------------------------------------------------------------ control
    def on_control_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        handler = self._control_handlers.get(type(msg))
        if handler is not None:
            handler(conn, msg)
        # Everything else (pings, unknown types) is ignored by design (forward compatible).

    def _control_table(self) -> dict[type, Callable[[ZtnaConnection, Any], None]]:
        """The Intermediate's one dispatch table for control messages from its peers."""
        table: dict[type, Callable[[ZtnaConnection, Any], None]] = {
            Hello: lambda conn, msg: self.adopt_stable_id(conn, msg.instance),
            Register: self._register,
            ServiceHealth: self._service_health,
        }
        for kind in (*PUNCH_MESSAGES, StandingCandidates):
            table[kind] = self._signal
        # From another member of the cluster: one of its Agents we relay for has gone.
        table[AgentGone] = self._remote_agent_gone
        table[MeshSignal] = self._mesh_signal
        return table

    def _mesh_signal(self, conn: ZtnaConnection, msg: MeshSignal) -> None:
        if self.mesh is not None:
            self.mesh.on_member_signal(conn, msg)

    def _remote_agent_gone(self, conn: ZtnaConnection, msg: AgentGone) -> None:
        if self.mesh is not None:
            self.mesh.remote_agent_gone(conn, msg.agent)

    def _register(self, conn: ZtnaConnection, msg: Register) -> None:
        reply, notes = self.registry.register(conn.user, msg)
        self._log_registration(conn, msg, reply)
        setup = self.setup_times.get(conn)
        if setup is not None and "registration_ms" not in setup and not isinstance(reply, RegistrationNack):
            # Handshake done → first registration acknowledged (0 with 0-RTT early data).
            since = conn.created_at + (setup.get("handshake_ms") or 0) / 1000
            setup["registration_ms"] = max(0.0, self._now() - since) * 1000
        conn.send_control(encode_control(reply))
        self.execute(notes)
        held = self._held.pop(conn, None)
        if held:
            for data in held:  # tunnel packets that overtook this registration
                self.on_datagram(conn, data)

    def _signal(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        if self.signaling is None:   # signaling off (--no-p2p): ignored like unknown types
            return
        if self.mesh is not None and self.mesh.signal(conn.user, msg):
            return       # the service's Connector is on another member: signaled there
        now = asyncio.get_running_loop().time()
        self.execute(self.signaling.handle(conn.user, msg, self.registry, now=now))

    def _service_health(self, conn: ZtnaConnection, msg: ServiceHealth) -> None:
        peer_id = conn.user
        before = self.registry.is_healthy(peer_id, msg.service)
        notes = self.registry.set_health(peer_id, msg.service, msg.healthy, self._now())
        if peer_id not in self.registry.peers or msg.service not in self.registry.peers[peer_id].connector_services:
            self._bad.warning("health report for a service the peer does not serve", f"{conn.label} → {msg.service}")
        elif before != msg.healthy:
            log.log(logging.INFO if msg.healthy else logging.WARNING,
                    "%s: service %r %s (%s)", conn.label, msg.service,
                    "healthy again" if msg.healthy else "unhealthy: no new flows while another Connector is healthy",
                    msg.detail or "-")
            if not self.registry.pool_healthy(msg.service):
                log.warning("service %r: no healthy Connector; new flows go to the least-recently-failed one",
                            msg.service)
        self.execute(notes)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    # An Agent resuming with 0-RTT sends Hello, Register and its first tunnel packets in
    # one flight; DATAGRAM frames may be packed before the STREAM frames, so those packets
    # can arrive just before the registration they depend on. Hold a few (bounded, only in the
    # first seconds of a connection) instead of dropping them.
    EARLY_HOLD_PACKETS = 32
    EARLY_HOLD_SECONDS = 2.0

    def _hold_early(self, conn: ZtnaConnection, data: bytes) -> bool:
        if asyncio.get_running_loop().time() - conn.created_at > self.EARLY_HOLD_SECONDS:
            return False
        held = self._held.setdefault(conn, [])
        if len(held) >= self.EARLY_HOLD_PACKETS:
            return False
        held.append(bytes(data))
        self.stats.held_until_registered += 1
        return True

    def adopt_stable_id(self, conn: ZtnaConnection, instance: int) -> None:
        """Re-key a fresh peer to the id derived from its certificate and `Hello.instance`
        (docs/protocol.md "Peer ids"), so the Connector's flows survive reconnects."""
        old_id = conn.user
        peer = self.registry.peers.get(old_id)
        if peer is None or peer.agent_services or peer.connector_services:
            return  # only before the first registration
        fingerprint = conn.identity.fingerprint if conn.identity is not None else "anonymous"
        key = (fingerprint, instance)
        new_id = stable_peer_id(fingerprint, instance)
        if new_id == old_id:
            return
        if new_id in self.registry.peers and new_id not in self.conns:
            return  # a remote Agent's id (the mesh): keep the sequential one
        other = self.conns.get(new_id)
        if other is not None:
            if self._instances.get(new_id) != key:
                return  # someone else's id: keep the sequential one
            # A stale connection of this same client: the same certificate and the same
            # Hello instance (an Agent process, or a Connector's configured name, which a
            # restarted Connector keeps). Its registrations, splices and punch sessions go
            # at once — a Connector killed without a goodbye would otherwise keep a place in
            # its services' pools, and get relayed streams, punches and UDP flows, until the
            # idle timeout. Quietly: no AgentGone, no "service down"; the client is still
            # here and registers again on this connection right away.
            del self.conns[new_id]
            self._held.pop(other, None)
            stale = self.registry.peers.get(new_id)
            role = "connector" if stale is not None and stale.connector_services else "agent"
            self.registry.remove_peer(new_id)
            self.sync_routes()
            if self.signaling is not None:
                self.execute(self.signaling.peer_gone(new_id))
            if self.streams is not None:
                # Splice legs are keyed by (peer id, stream id) and the new connection
                # numbers its streams from 0 again: the old legs must not catch them.
                self.streams.peer_gone(new_id)
            other.close(0, f"superseded by a new connection of the same {role}")
            log.info("%s superseded by a new connection from %s", other.label,
                     normalize_address(conn.peer_address)[0])
        del self.conns[old_id]
        self.registry.peers.pop(old_id, None)
        conn.user = new_id
        conn.label = conn.label.rsplit("#", 1)[0] + f"#{new_id}"
        self.conns[new_id] = conn
        self._instances[new_id] = key
        self.registry.add_peer(new_id, peer.auth, conn.label)

    def _log_registration(self, conn: ZtnaConnection, msg: Register, reply: object) -> None:
        if isinstance(reply, RegistrationNack):
            log.warning("%s: %s registration for %r refused (%s)", conn.label, msg.role.value, msg.service_id, reply.status.name)
        else:
            log.info("%s registered as %s for %r", conn.label, msg.role.value, msg.service_id)

    # ------------------------------------------------------------------ relay (hot path)
    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        kind = data[0]
        stats = self.stats
        if kind == SERVICE_DATAGRAM:
            try:
                service, packet = decode_service_datagram(data)
            except DecodeError as exc:
                stats.dropped_malformed += 1
                self._bad.warning("malformed 0x2F datagram", str(exc))
                return
            peer_id = conn.user
            registry = self.registry
            if not registry.is_agent_of(peer_id, service):
                if self._hold_early(conn, data):
                    return
                stats.dropped_unregistered += 1
                self._bad.warning("0x2F from a peer not registered as agent", f"{conn.label} → {service}")
                return
            target_id = registry.connector_for(service, packet, now=self._now())
            target = self.conns.get(target_id) if target_id is not None else None
            if target is None:
                if self.mesh is not None and self.mesh.forward(peer_id, service, packet, data):
                    return
                stats.dropped_no_connector += 1
                self._bad.warning("no connector for service", service)
                return
            out = to_connector_from_service_datagram(peer_id, data)
        elif kind == FROM_CONNECTOR:
            try:
                agent_id, packet = decode_from_connector(data)
            except DecodeError as exc:
                stats.dropped_malformed += 1
                self._bad.warning("malformed 0x31 datagram", str(exc))
                return
            if not self.registry.may_reply(conn.user, agent_id):
                stats.dropped_bad_reply += 1
                self._bad.warning("0x31 reply to an agent this connector does not serve", f"{conn.label} → {agent_id}")
                return
            target = self.conns.get(agent_id)
            if target is None:
                if self.mesh is None or not self.mesh.reply(agent_id, packet):
                    stats.dropped_bad_reply += 1
                return
            out = bytes(packet)
        elif kind in (REGISTER_AGENT, REGISTER_CONNECTOR):
            # Registration also accepted as a DATAGRAM (the original's carriage); the reply
            # goes back the same way. The control stream is the reliable path.
            try:
                msg = decode_registration(data)
            except DecodeError:
                stats.dropped_malformed += 1
                return
            if isinstance(msg, Register):
                reply, notes = self.registry.register(conn.user, msg)
                self._log_registration(conn, msg, reply)
                conn.send_datagram(encode_registration(reply))
                self.execute(notes)
            return
        elif kind in (MESH_TO_CONNECTOR, MESH_FROM_CONNECTOR) and self.mesh is not None:
            self.mesh.on_member_datagram(conn, data)
            return
        else:
            stats.dropped_unknown_type += 1
            self._bad.warning("datagram of unknown type", f"0x{kind:02x} from {conn.label}")
            return
        if len(out) > target.max_datagram_payload():
            stats.dropped_oversize += 1
            self._bad.warning("relayed datagram larger than the next hop allows", f"{len(out)} > {target.max_datagram_payload()}")
            return
        target.send_datagram(out)
        stats.relayed_datagrams += 1
        stats.relayed_bytes += len(out)

    # ------------------------------------------------------------------ observability
    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self.ready and not self.draining and all(not ep._closed for ep in self.endpoints)
        detail: dict[str, Any] = {"connections": len(self.conns), "draining": self.draining}
        if self.cluster is not None:
            # Still serving without the store (no 0-RTT): degraded, not down.
            detail["cluster"] = self.cluster.health_detail()
        return ok, detail

    def _stats_source(self) -> list[tuple[str, str, str, float, dict[str, str] | None]]:
        loop = asyncio.get_event_loop()
        out: list[tuple[str, str, str, float, dict[str, str] | None]] = []
        s = self.stats
        totals: dict[str, int] = {}
        for ep in self.endpoints:
            for k, v in ep.stats.as_dict().items():
                totals[k] = totals.get(k, 0) + v
        # The relay totals count both paths: native routes and Python (ztna_quic_relay_*
        # has the native share alone).
        out.append(("ztna_active_connections", "gauge", "Established QUIC connections", len(self.conns), None))
        out.append(("ztna_relay_bytes_total", "counter", "Bytes relayed",
                    s.relayed_bytes + totals.get("relay_bytes", 0), None))
        out.append(("ztna_datagrams_relayed_total", "counter", "DATAGRAMs relayed",
                    s.relayed_datagrams + totals.get("relay_forwarded", 0), None))
        out.append(("ztna_registrations_total", "counter", "Acknowledged registrations", self.registry.registrations, None))
        out.append(("ztna_registration_rejections_total", "counter", "NACKed registrations", self.registry.rejections, None))
        for healthy in (False, True):
            out.append(("ztna_connector_health_transitions_total", "counter",
                        "Connector health reports that changed its state, by the new state",
                        self.registry.health_transitions[healthy], {"state": "healthy" if healthy else "unhealthy"}))
        out.append(("ztna_connector_health_reports_ignored_total", "counter",
                    "Health reports for a service the Connector does not serve", self.registry.health_ignored, None))
        unhealthy = sum(1 for peer in self.registry.peers.values()
                        for service in peer.connector_services if not peer.health.get(service, True))
        out.append(("ztna_unhealthy_connectors", "gauge", "(Connector, service) pairs reported unhealthy", unhealthy, None))
        out.append(("ztna_services_without_healthy_connector", "gauge",
                    "Services whose Connectors are all unhealthy (new flows go to the least-recently-failed)",
                    sum(1 for service in self.registry.connectors if not self.registry.pool_healthy(service)), None))
        out.append(("ztna_relay_flow_pins", "gauge", "Relayed datagram flows pinned to a Connector",
                    len(self.registry.pins), None))
        out.append(("ztna_uptime_seconds", "gauge", "Seconds since start", loop.time() - self.started_at, None))
        for reason in ("unregistered", "no_connector", "bad_reply", "oversize", "malformed", "unknown_type"):
            native = totals.get("relay_dropped_oversize", 0) if reason == "oversize" else 0
            out.append(("ztna_relay_dropped_total", "counter", "Relay drops by reason",
                        getattr(s, f"dropped_{reason}") + native, {"reason": reason}))
        out.append(("ztna_relay_dropped_total", "counter", "Relay drops by reason",
                    totals.get("relay_dropped_no_target", 0), {"reason": "no_target"}))
        for k, v in totals.items():
            out.append((f"ztna_quic_{k}_total", "counter", f"QUIC endpoint: {k.replace('_', ' ')}", v, None))
        out.append(("ztna_retry_tokens_validated", "counter", "Valid retry tokens", totals.get("retry_validated", 0), None))
        out.append(("ztna_retry_token_failures", "counter", "Invalid retry tokens", totals.get("retry_failures", 0), None))
        store = self.options.ticket_store
        if store is not None:
            t = store.stats
            out.append(("ztna_session_tickets_issued_total", "counter", "Session tickets issued", t.issued, None))
            out.append(("ztna_zero_rtt_resumptions_total", "counter",
                        "Resumptions (0-RTT) accepted with a single-use ticket", t.resumed, None))
            for reason in ("unknown", "expired", "rotated", "store_down"):
                if not hasattr(t, f"refused_{reason}"):
                    continue
                out.append(("ztna_session_tickets_refused_total", "counter",
                            "Tickets refused (unknown = already used or never issued: replay protection)",
                            getattr(t, f"refused_{reason}"), {"reason": reason}))
        out.append(("ztna_relay_held_until_registered_total", "counter",
                    "Tunnel packets held until the registration in the same flight",
                    s.held_until_registered, None))
        if self.cluster is not None:
            out.extend(self.cluster.metrics())
        if self.mesh is not None:
            out.extend(self.mesh.metrics())
        if self.signaling is not None:
            for name, kind, help_text, value, labels in self.signaling.metrics():
                out.append((name, kind, help_text, value, labels))
        out.extend(self.revocation.metrics())
        if self.admin_server is not None:
            out.extend(self.admin_server.metrics())
        return out

    # ------------------------------------------------------------------ admin (AdminSource)
    def admin_snapshot(self) -> Snapshot:
        """Everything the admin API shows, copied in one go (ztna.intermediate.admin)."""
        now_loop, now_wall = asyncio.get_running_loop().time(), time.time()
        reg = self.registry
        outcomes = self.signaling.outcomes if self.signaling is not None else {}
        views: dict[int, ConnectionView] = {}
        for peer_id, conn in self.conns.items():
            peer = reg.peers.get(peer_id)
            if peer is None:
                continue
            stats = conn.stats()
            rtt = stats.get("rtt")
            sans = self._sans.get(peer_id)
            if sans is None:
                cert = conn.peer_certificate
                sans = self._sans[peer_id] = tuple(certificate_names(cert)) if cert is not None else ()
            paths: dict[str, str] = {}
            warm: dict[str, float] = {}
            for service in peer.agent_services:
                outcome = outcomes.get((peer_id, service))
                paths[service] = "direct" if outcome is not None and outcome[0] else "relay"
                if outcome is not None and outcome[0]:
                    warm[service] = round(outcome[1] * 1000.0, 1)
            views[peer_id] = ConnectionView(
                peer_id=peer_id,
                identity=conn.identity.common_name if conn.identity is not None else "anonymous",
                sans=sans,
                agent_services=tuple(sorted(peer.agent_services)),
                connector_services=tuple(sorted(peer.connector_services)),
                address=format_address(conn.peer_address),
                rtt_ms=round(float(rtt) * 1000.0, 2) if rtt is not None else None,
                bytes_sent=int(stats.get("udp_tx_bytes", 0)),
                bytes_received=int(stats.get("udp_rx_bytes", 0)),
                connected_at=now_wall - (now_loop - conn.created_at),
                health=dict(peer.health), draining=peer_id in reg.draining,
                paths=paths, warmup_ms=warm)
        if len(self._sans) > len(self.conns) + 64:
            self._sans = {k: v for k, v in self._sans.items() if k in self.conns}
        warmup = self.signaling.warmup.frozen() if self.signaling is not None else LatencyHistogram().frozen()
        totals = sum(ep.stats.as_dict().get("relay_bytes", 0) for ep in self.endpoints)
        return Snapshot(
            taken_at=now_wall,
            pools={s: tuple(p) for s, p in reg.connectors.items()},
            agents={s: tuple(sorted(a)) for s, a in reg.agents.items()},
            connections=views,
            flows=tuple(self.streams.flows()) if self.streams is not None else (),
            handshake=self.handshakes.frozen(), warmup=warmup,
            relayed_bytes=self.stats.relayed_bytes + totals)

    def drain_connector(self, peer_id: int, drain: bool) -> bool:
        ok = self.registry.set_draining(peer_id, drain)
        if ok:
            self.sync_routes()
        return ok

    def disconnect_identity(self, identity: str) -> int:
        closed = 0
        for conn in list(self.conns.values()):
            if conn.identity is not None and conn.identity.common_name == identity and not conn.closed:
                conn.close(CLOSE_AUTH, "disconnected by the administrator")
                closed += 1
        return closed

    def _metrics_registry(self) -> CollectorRegistry:
        reg = CollectorRegistry()
        reg.register(StatsCollector(self._stats_source))
        return reg


class _PeerHandler(ConnectionHandler):
    """Events of one peer connection. 0-RTT: a resumed peer's identity comes with its
    ticket, so early data (registrations, first tunnel packets) is served at once; early
    bytes of a peer whose identity is not known yet wait (bounded) for the handshake."""

    __slots__ = ("server", "decoder", "early")

    EARLY_LIMIT = 65536
    # Control messages kept the same way: a Hello and a Register per service fit many times.
    EARLY_MESSAGES = 64

    def __init__(self, server: Intermediate) -> None:
        self.server = server
        self.early: list[tuple[str, bytes]] = []
        self.early_messages: list[ControlMessage] = []

    def _ready(self, conn: ZtnaConnection) -> bool:
        if conn.user is None and conn.identity is not None and not conn.closed:
            self.server.peer_up(conn)  # resumed session: identity restored from the ticket
        return conn.user is not None

    def _hold(self, kind: str, data: bytes) -> None:
        if sum(len(d) for _, d in self.early) + len(data) <= self.EARLY_LIMIT:
            self.early.append((kind, data))

    def _hold_message(self, msg: ControlMessage) -> None:
        if len(self.early_messages) < self.EARLY_MESSAGES:
            self.early_messages.append(msg)

    def on_handshake(self, conn: ZtnaConnection) -> None:
        if conn.user is None:
            self.server.peer_up(conn)
        messages, self.early_messages = self.early_messages, []
        for msg in messages:
            self.on_message(conn, msg)
        early, self.early = self.early, []
        for _kind, data in early:
            self.on_datagram(conn, data)

    def on_path_changed(self, conn: ZtnaConnection) -> None:
        if conn.user is not None:
            log.info("%s moved to %s (NAT rebinding); re-sending QAD", conn.label, format_address(conn.peer_address))
            self.server.send_qad(conn)

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        if conn.user is not None or self._ready(conn):
            if data:
                self.server.on_datagram(conn, data)
        else:
            self._hold("d", data)

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        if conn.user is None and not self._ready(conn):
            self._hold_message(msg)
            return
        self.server.on_control_message(conn, msg)

    def on_control_error(self, conn: ZtnaConnection, error: ProtocolError) -> None:
        self.server.stats.control_errors += 1

    def on_stream_data(self, conn: ZtnaConnection, stream_id: int, data: bytes, end: bool) -> None:
        if self.server.streams is not None and conn.user is not None:
            self.server.streams.on_stream_data(conn, stream_id, data, end)
        else:
            conn.reset_stream(stream_id)

    def on_stream_reset(self, conn: ZtnaConnection, stream_id: int, error_code: int) -> None:
        if self.server.streams is not None:
            self.server.streams.on_stream_reset(conn, stream_id, error_code)

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None:
        self.server.peer_down(conn, reason)


def tls_from_args(cert: str, key: str, ca: str) -> TlsFiles:
    return TlsFiles(cert=Path(cert), key=Path(key), ca=Path(ca))
