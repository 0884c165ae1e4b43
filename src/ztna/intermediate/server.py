"""The Intermediate: the asyncio driver that owns the endpoints and wires the pure parts.

Per connection: on handshake it gets a peer id (`ztna.intermediate.peers`) and its QAD
(`ztna.intermediate.qad`), re-sent whenever its address changes. Control frames (stream 0)
carry registration (`ztna.intermediate.registry`) and signaling
(`ztna.intermediate.signaling`); DATAGRAMs carry tunnel traffic, decided by
`ztna.intermediate.relay` (0x2F from Agents → 0x30 to a Connector; 0x31 from Connectors →
the bare IP packet to exactly that Agent), which also says which routes the native core may
take over. TCP-carrying streams are spliced by `ztna.intermediate.streams`; /metrics is
`ztna.intermediate.metrics`.

No decision lives here that the pure parts can make; this module moves bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from ztna import limits
from ztna.early import EarlyHold
from ztna.errors import ProtocolError
from ztna.identity import ChainVerifier, certificate_names, load_ca_file
from ztna.intermediate.admin.snapshot import ConnectionView, LatencyHistogram, Snapshot
from ztna.intermediate.metrics import RowSource, intermediate_metrics
from ztna.intermediate.peers import EarlyFlight, PeerIds, registration_hold
from ztna.intermediate.qad import send_qad
from ztna.intermediate.registry import AllowAll, Notify, Registry
from ztna.intermediate.relay import (
    AgentElsewhere,
    Drop,
    Forward,
    MemberDatagram,
    NoLocalConnector,
    Registration,
    Relay,
    RelayStats,
    RouteTable,
    Unregistered,
    apply_routes,
    routes_for,
)
from ztna.metrics import MetricRow
from ztna.observe import (
    MetricsServer,
    RateLimitedLog,
    collector_registry,
    format_address,
    serve_metrics,
)
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
    PUNCH_MESSAGES,
    AddressToken,
    AgentGone,
    ControlMessage,
    GoAway,
    Hello,
    MeshSignal,
    Register,
    RegistrationNack,
    ServiceHealth,
    StandingCandidates,
    encode_control,
    encode_registration,
)

log = logging.getLogger("ztna.intermediate")

__all__ = ["Intermediate", "IntermediateOptions", "RelayStats", "tls_from_args"]


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


class Intermediate:
    def __init__(self, options: IntermediateOptions) -> None:
        self.options = options
        self.registry = Registry(max_registrations=options.max_registrations)
        self.conns: dict[int, ZtnaConnection] = {}
        self.relay = Relay(self.registry, self.conns, self._now)
        self.stats = self.relay.stats
        self.endpoints: list[QuicEndpoint] = []
        self.metrics_server: MetricsServer | None = None
        self.draining = False
        self.ready = False
        self.peer_ids = PeerIds()
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
        # Tunnel packets that overtook their registration, per connection.
        self._held: dict[ZtnaConnection, EarlyHold[bytes]] = {}
        self._control_handlers = self._control_table()
        self.routes = RouteTable()      # the native relay routes installed
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
        return self.peer_ids.next_id(lambda p: p in self.conns or p in self.registry.peers)

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
            self.endpoints.append(QuicEndpoint(sock, server=self._server_options, loop=loop, thread=True))
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
            host, port = self.options.metrics
            self.metrics_server = await serve_metrics(self._stats_source, self._health, host, port, logger=log)
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
        self.peer_ids.forget(peer_id)
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
        send_qad(conn)

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
    # The relay decision is Python's (registry); where it is the same for every packet it is
    # installed as native routes (ztna.intermediate.relay). Everything else (several
    # Connectors: a per-flow choice; IPv4 and IPv6 sockets; no Connector; malformed) still
    # comes to `on_datagram`.
    def sync_routes(self) -> None:
        changed = self.registry.take_changed()
        if not changed:
            return
        registry, conns = self.registry, self.conns
        apply_routes(self.routes.sync(changed, lambda service: registry.agents.get(service, ()),
                                      lambda service, agent: routes_for(registry, conns, service, agent)))

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
        if held is not None:
            for data in held.release():  # tunnel packets that overtook this registration
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

    def _hold_early(self, conn: ZtnaConnection, data: bytes | memoryview) -> bool:
        """Hold a tunnel packet that may have overtaken its registration (peers.EarlyHold)."""
        held = self._held.get(conn)
        if held is None:
            held = self._held[conn] = registration_hold(conn.created_at)
        if not held.hold(bytes(data), now=self._now()):
            return False
        self.stats.held_until_registered += 1
        return True

    def adopt_stable_id(self, conn: ZtnaConnection, instance: int) -> None:
        """Re-key a fresh peer to the id derived from its certificate and `Hello.instance`
        (docs/protocol.md "Peer ids"), so the Connector's flows survive reconnects."""
        old_id = conn.user
        fingerprint = conn.identity.fingerprint if conn.identity is not None else "anonymous"
        adopt = self.peer_ids.adoption(self.registry, self.conns, old_id, fingerprint, instance)
        if adopt is None:
            return
        new_id = adopt.new_id
        if adopt.supersede:
            other = self.conns[new_id]
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
        peer = self.registry.peers[old_id]
        del self.conns[old_id]
        self.registry.peers.pop(old_id, None)
        conn.user = new_id
        conn.label = conn.label.rsplit("#", 1)[0] + f"#{new_id}"
        self.conns[new_id] = conn
        self.peer_ids.adopted(adopt)
        self.registry.add_peer(new_id, peer.auth, conn.label)

    def _log_registration(self, conn: ZtnaConnection, msg: Register, reply: object) -> None:
        if isinstance(reply, RegistrationNack):
            log.warning("%s: %s registration for %r refused (%s)", conn.label, msg.role.value, msg.service_id, reply.status.name)
        else:
            log.info("%s registered as %s for %r", conn.label, msg.role.value, msg.service_id)

    # ------------------------------------------------------------------ relay (hot path)
    def on_datagram(self, conn: ZtnaConnection, data: bytes | memoryview) -> None:
        """Carry out the relay's decision for one DATAGRAM of a served peer."""
        relay = self.relay
        d = relay.decide(conn.user, conn.label, data)
        if type(d) is Forward:
            d.conn.send_datagram(d.payload)
            return
        if d is None:
            return
        if isinstance(d, Unregistered):
            if self._hold_early(conn, d.data):
                return
            d = relay.refuse_unregistered(conn.label, d.service)
        elif isinstance(d, NoLocalConnector):
            if self.mesh is not None and self.mesh.forward(d.agent, d.service, d.packet, d.data):
                return
            d = relay.no_connector(d.service)
        elif isinstance(d, AgentElsewhere):
            if self.mesh is not None and self.mesh.reply(d.agent, d.packet):
                return
            d = relay.reply_gone()
        elif isinstance(d, Registration):
            # Registration also accepted as a DATAGRAM (the original's carriage); the reply
            # goes back the same way. The control stream is the reliable path.
            reply, notes = self.registry.register(conn.user, d.message)
            self._log_registration(conn, d.message, reply)
            conn.send_datagram(encode_registration(reply))
            self.execute(notes)
            return
        elif isinstance(d, MemberDatagram):
            if self.mesh is not None:
                self.mesh.on_member_datagram(conn, data)
                return
            d = relay.unknown_type(data[0], conn.label)
        if isinstance(d, Drop) and d.message:
            self._bad.warning(d.message, d.detail)

    # ------------------------------------------------------------------ observability
    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self.ready and not self.draining and all(not ep._closed for ep in self.endpoints)
        detail: dict[str, Any] = {"connections": len(self.conns), "draining": self.draining}
        if self.cluster is not None:
            # Still serving without the store (no 0-RTT): degraded, not down.
            detail["cluster"] = self.cluster.health_detail()
        return ok, detail

    # What the metrics table reads (ztna.intermediate.metrics.IntermediateView).
    @property
    def connection_count(self) -> int:
        return len(self.conns)

    def endpoint_totals(self) -> Mapping[str, int]:
        totals: dict[str, int] = {}
        for ep in self.endpoints:
            for k, v in ep.stats.as_dict().items():
                totals[k] = totals.get(k, 0) + v
        return totals

    @property
    def ticket_stats(self) -> Any:
        store = self.options.ticket_store
        return store.stats if store is not None else None

    def row_sources(self) -> Iterable[RowSource]:
        parts = (self.cluster, self.mesh, self.signaling, self.revocation, self.admin_server)
        return [part for part in parts if part is not None]

    def _stats_source(self) -> list[MetricRow]:
        return intermediate_metrics(self, asyncio.get_event_loop().time())

    def metrics_registry(self) -> CollectorRegistry:
        """What /metrics serves, for a caller that reads it in process."""
        return collector_registry(self._stats_source)

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


class _PeerHandler(ConnectionHandler):
    """Events of one peer connection. 0-RTT: a resumed peer's identity comes with its
    ticket, so early data (registrations, first tunnel packets) is served at once; early
    bytes of a peer whose identity is not known yet wait (bounded) for the handshake."""

    __slots__ = ("server", "early")

    def __init__(self, server: Intermediate) -> None:
        self.server = server
        self.early = EarlyFlight()

    def _ready(self, conn: ZtnaConnection) -> bool:
        if conn.user is None and conn.identity is not None and not conn.closed:
            self.server.peer_up(conn)  # resumed session: identity restored from the ticket
        return conn.user is not None

    def on_handshake(self, conn: ZtnaConnection) -> None:
        if conn.user is None:
            self.server.peer_up(conn)
        messages, datagrams = self.early.take()
        for msg in messages:
            self.on_message(conn, msg)
        for data in datagrams:
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
            self.early.hold_datagram(data)

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        if conn.user is None and not self._ready(conn):
            self.early.hold_message(msg)
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
