"""The App Connector: wires the relay link, the P2P server and the flow tables together.

Packet path (hot, no per-packet logging): a 0x30 DATAGRAM from the Intermediate (or 0x2F on
a direct connection) → `on_packet(path, service, packet)` → the service's virtual IPs are
checked (anything else is dropped and counted) → by protocol: `TcpFlows` (TCP-in-DATAGRAM),
`UdpFlows`, or an ICMP echo reply. Streams go to `StreamTable`. Flows are keyed by (agent
id, inner 5-tuple) and every reply goes back on the `ReplyPath` the flow's latest packet came
from; a dead path hands its flows to the same Agent's other live path (`AgentPaths`), so a
TCP connection survives relay ↔ direct switches.

Sockets: the relay socket (client connection to the Intermediate, ephemeral unless
`relay_port`) and the P2P socket (server for direct Agents, default 4434) are separate.

Relay links: one by default, failing over along `--intermediate A,B,...`. With `--attach
all` one link per Intermediate, all at once, on the one relay socket: each registers every
service, so the services survive the loss of any one Intermediate without a reconnect. The
agent ids of different links are different namespaces (`ReplyPath.key`): two Intermediates
may give one id to two Agents, and their flows must never meet.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import socket
from collections.abc import Callable
from typing import Any

from ztna.connector import icmp
from ztna.connector.config import ConnectorConfig, HealthCheck, ServiceConfig
from ztna.connector.health import HealthProber, probe_http, probe_tcp, probe_udp
from ztna.connector.p2p_server import P2PServer
from ztna.connector.paths import AgentPaths, ReplyPath, owner_key
from ztna.connector.punch import ConnectorPunch
from ztna.connector.relay_link import RelayLink
from ztna.connector.state import ConnectorStats, ServiceState
from ztna.connector.streams import StreamTable
from ztna.connector.tcp_flows import TcpFlows
from ztna.connector.udp_flows import UdpFlows
from ztna.errors import DecodeError, UsageError
from ztna.netstack.packets import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, parse_ip
from ztna.observe import format_address
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ZtnaConnection
from ztna.quic.endpoint import CLOSE_AUTH, QuicEndpoint, bind_udp
from ztna.revocation_guard import RevocationGuard
from ztna.startup import bind_error
from ztna.wire import TO_CONNECTOR, ServiceHealth, decode_to_connector, encode_control

log = logging.getLogger("ztna.connector")

SWEEP_INTERVAL = 1.0
RESOLVE_INTERVAL = 30.0
RELAY_GRACE = 20.0       # how long relay flows wait for the Intermediate to come back


class Connector:
    def __init__(self, cfg: ConnectorConfig, *, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.rng = rng or random.SystemRandom()
        self.stats = ConnectorStats()
        self.services = {s.id: ServiceState(s) for s in cfg.services}
        self.tls = TlsFiles(cert=cfg.cert, key=cfg.key, ca=cfg.ca)
        self.revocation = RevocationGuard(cfg.revoked, close_code=CLOSE_AUTH)
        self.agents = AgentPaths()
        self._parked: dict[int, tuple[ReplyPath, float]] = {}   # agent id -> (dead relay path, since)
        self.relay: RelayLink | None = None        # the first (with --attach all: of several)
        self.relays: list[RelayLink] = []
        self.relay_endpoint: QuicEndpoint | None = None
        self.p2p: P2PServer | None = None
        self.punch: ConnectorPunch | None = None
        self.metrics_server: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.udp: UdpFlows
        self.tcp: TcpFlows
        self.streams: StreamTable
        self.started_at = 0.0
        self.stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopped = asyncio.Event()
        self._kick_scheduled = False
        self.audit: Any = None     # a ztna.connector.flow_audit.ConnectorAudit with --audit-log
        self.backend_health = HealthProber(self._health_changed)
        for svc in cfg.services:
            self.backend_health.add_service(svc.id)
            for check in svc.health_checks():
                self._add_check(svc, check)

    # ------------------------------------------------------------------ health
    def _add_check(self, svc: ServiceConfig, check: HealthCheck) -> None:
        assert check.port is not None   # health_checks() resolves "every TCP backend"
        backend = (svc.udp if check.kind == "udp" else svc.tcp)[check.port]
        host, port, timeout = backend.host, backend.port, check.timeout
        name = f"{check.kind} {check.port}"
        if check.kind == "tcp":
            def probe() -> Any:
                return probe_tcp(host, port, timeout)
        elif check.kind == "http":
            path, status = check.path, check.status
            name = f"http {check.port}{path}"

            def probe() -> Any:
                return probe_http(host, port, path, status, timeout)
        else:
            payload, expect = bytes.fromhex(check.probe), bytes.fromhex(check.expect)

            def probe() -> Any:
                return probe_udp(host, port, payload, expect, timeout)
        self.backend_health.add_check(svc.id, name, interval=check.interval, fall=check.fall,
                              rise=check.rise, probe=probe)

    def health_message(self, service: str) -> ServiceHealth:
        state = self.backend_health.states.get(service)
        healthy = state is None or state.healthy
        return ServiceHealth(service=service, healthy=healthy,
                             detail=state.detail() if state is not None and state.checks else None)

    def _health_changed(self, service: str, healthy: bool, detail: str) -> None:
        """A service's backend changed state: tell the Intermediate (so new flows avoid us
        while another Connector is healthy) and the Agents connected to us directly."""
        data = encode_control(self.health_message(service))
        for relay in self.relays:
            if relay.conn is not None and relay.registered(service):
                relay.conn.send_control(data)
        if self.p2p is not None:
            self.p2p.send_to_registered(service, data)

    def punch_ms_for(self, addr: tuple[Any, ...]) -> float | None:
        """How long the punch that made a direct connection from `addr` took (ms), if any."""
        return self.punch.punch_ms_for(addr) if self.punch is not None else None

    def _service_registered(self, conn: ZtnaConnection, service: str) -> None:
        conn.send_control(encode_control(self.health_message(service)))

    # ------------------------------------------------------------------ lifecycle
    def _attached_to(self) -> tuple[str, int]:
        """The Intermediate the (first) relay link is on or trying: the P2P socket's too."""
        if self.relay is not None:
            return (self.relay.host, self.relay.port)
        return (self.cfg.intermediate.host, self.cfg.intermediate.port)

    def _relay_configuration(self, link: RelayLink | None = None) -> Any:
        # The name of the Intermediate the link tries now (given several, they take turns).
        link = link or self.relay
        host = link.host if link is not None else self.cfg.intermediate.host
        return make_configuration(is_client=True, tls=self.tls, server_name=self.cfg.server_name or host,
                                  udp_payload=self.cfg.udp_payload)

    def _configuration_of(self, link: RelayLink) -> Callable[[], Any]:
        return lambda: self._relay_configuration(link)

    async def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        lim = self.cfg.limits
        self.udp = UdpFlows(loop, self.stats, total_limit=lim.udp_flows_total,
                            per_service_limit=lim.udp_flows_per_service,
                            idle_timeout=lim.udp_idle_timeout)
        self.tcp = TcpFlows(loop, self.stats, max_sessions=lim.tcp_sessions,
                            syn_rate=lim.tcp_syn_per_source_per_second,
                            connect_timeout=lim.tcp_connect_timeout, buffer=lim.tcp_buffer,
                            flow_control=lim.flow_control, rng=self.rng)
        from ztna.connector.resolve import NameResolver

        dns = self.cfg.dns_server
        self.streams = StreamTable(loop, self.stats, self.services, max_streams=lim.streams,
                                   connect_timeout=lim.tcp_connect_timeout,
                                   resolver=NameResolver(None if dns is None else (dns.host, dns.port),
                                                         timeout=lim.tcp_connect_timeout))
        if self.cfg.audit_log is not None:
            from ztna.audit import AuditLog
            from ztna.connector.flow_audit import ConnectorAudit

            try:
                audit_log = AuditLog(self.cfg.audit_log, process="connector",
                                     max_bytes=self.cfg.audit_log_max_bytes,
                                     backups=self.cfg.audit_log_backups,
                                     interval=self.cfg.audit_interval_minutes * 60)
            except OSError as exc:
                raise UsageError(f"cannot open the audit log {str(self.cfg.audit_log)!r}: "
                                 f"{exc.strerror or exc}") from None
            self.audit = ConnectorAudit(audit_log)
            self.tcp.audit = self.udp.audit = self.streams.audit = self.audit
            audit_log.start(lambda: self.audit.live(self.tcp, self.udp, self.streams) if self.audit else [])
        await self._resolve_backends()
        inter = self.cfg.intermediate
        # Relay socket: its own UDP socket (ephemeral by default).
        try:
            relay_sock = bind_udp(self.cfg.relay_host, self.cfg.relay_port)
        except OSError as exc:
            raise bind_error("Connector relay socket", "udp", self.cfg.relay_host,
                             self.cfg.relay_port, exc) from None
        self.relay_endpoint = QuicEndpoint(relay_sock, thread=True)
        log.info("relay socket on udp %s",
                 format_address((self.cfg.relay_host, self.relay_endpoint.local_address[1])))
        everyone = [(h.host, h.port) for h in self.cfg.intermediates] or [(inter.host, inter.port)]
        # --attach one: one link along the list; all: one link per Intermediate, each staying
        # with its own (nowhere to fail over to, but it leaves a silent one as fast).
        plan = [[t] for t in everyone] if self.cfg.attach == "all" else [everyone]
        for index, targets in enumerate(plan):
            link = RelayLink(
                self.relay_endpoint, host=targets[0][0], port=targets[0][1],
                config_factory=self._relay_configuration,
                services=list(self.services), sink=_RelaySide(self, index),
                rng=random.Random(self.rng.random()), name=self.cfg.connector_name(),
                alternates=targets if len(targets) > 1 else None, watch_silence=len(plan) > 1)
            link.config_factory = self._configuration_of(link)
            link.on_service_registered = self._service_registered
            self.relays.append(link)
            self._tasks.append(loop.create_task(link.run()))
        self.relay = self.relays[0]
        self.agents.links = len(self.relays)
        self.backend_health.start()
        if self.cfg.p2p_port is not None:
            self.p2p = P2PServer(self, host=self.cfg.p2p_host, port=self.cfg.p2p_port,
                                 tls=self.tls, udp_payload=self.cfg.udp_payload,
                                 intermediate=self._attached_to,
                                 server_name=self.cfg.server_name,
                                 rng=random.Random(self.rng.random()))
            self.p2p.start()
            self.punch = self.p2p.punch
            # A failover of the relay link takes the P2P socket's QAD along.
            self.relay.events.moved.append(lambda old, new: self.p2p.follow() if self.p2p else None)
            for link in self.relays:
                link.on_punch = self.punch.on_message
                link.on_registered = self.punch.on_registered
        if self.cfg.metrics is not None:
            from ztna.connector.metrics import start_metrics

            self.metrics_server = await start_metrics(self, self.cfg.metrics.host,
                                                      self.cfg.metrics.port)
        self._tasks.append(loop.create_task(self._sweeper()))
        for s in self.services.values():
            log.info("service %r: %s tcp %s udp %s icmp %s", s.id, ",".join(s.cfg.virtual_ips + s.cfg.domains),
                     {p: str(b) for p, b in s.cfg.tcp.items()} or "-",
                     {p: str(b) for p, b in s.cfg.udp.items()} or "-", "on" if s.icmp else "off")

    async def stop(self) -> None:
        """Graceful: RST open TCP sessions, reset streams, close QUIC, release sockets."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down")
        await self.backend_health.stop()
        for link in self.relays:
            link.stop()
        self.tcp.close_all()
        self.streams.close_all()
        self.udp.close_all()
        if self.p2p is not None:
            self.p2p.close()
        if self.relay_endpoint is not None:
            self.relay_endpoint.close(reason="connector shutting down")
        await asyncio.sleep(0.1)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.p2p is not None:
            self.p2p.shutdown_socket()
        if self.relay_endpoint is not None:
            self.relay_endpoint.shutdown_socket()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.audit is not None:
            self.audit.log.close()
        self._stopped.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, self.reload_revocations)
        try:
            await self.start()
        except BaseException:
            # e.g. the P2P or metrics port is taken: release what did start (the relay
            # connection, sockets) before the error reaches the operator.
            try:
                await self.stop()
            except Exception:  # noqa: BLE001 - the start-up error is the one to report
                log.debug("cleanup after a failed start", exc_info=True)
            raise
        await self._stopped.wait()

    def reload_revocations(self) -> None:
        """SIGHUP: read the revocation list again; close the direct connections of every
        Agent it now revokes (their flows move to the relay path, where the Intermediate's
        own list decides)."""
        if self.revocation.reload() and self.p2p is not None and self.p2p.endpoint is not None:
            self.revocation.sweep(self.p2p.endpoint.connections)

    async def _resolve_backends(self) -> None:
        assert self.loop is not None
        for svc in self.services.values():
            for b in svc.udp_backends.values():
                if b.resolved is not None and b.host.replace(".", "").isdigit():
                    continue
                try:
                    infos = await self.loop.getaddrinfo(b.host, b.port, type=socket.SOCK_DGRAM)
                    b.resolved = (infos[0][0], infos[0][4][:2])
                except (OSError, IndexError) as exc:
                    log.warning("cannot resolve UDP backend %s of %r: %s", format_address((b.host, b.port)),
                                svc.id, exc)

    async def _sweeper(self) -> None:
        assert self.loop is not None
        last_resolve = self.loop.time()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.loop.time()
            self.udp.sweep(now)
            self.agents.sweep()
            self._expire_parked(now)
            if now - last_resolve >= RESOLVE_INTERVAL:
                last_resolve = now
                await self._resolve_backends()

    # ------------------------------------------------------------------ relay sink
    def relay_up(self, conn: ZtnaConnection, link: int = 0) -> None:
        """Registered with the Intermediate again (called on every registration ACK): flows
        parked by the outage continue on the new relay connection (agent ids are stable
        across reconnects and Intermediate restarts)."""
        for key, (old, _) in list(self._parked.items()):
            if old.link != link or old.agent_id is None:
                continue
            del self._parked[key]
            new = self.agents.relay_path(conn, old.agent_id, link)
            moved = self.tcp.drop_path(old, new)
            self.udp.drop_path(old, new)
            if moved:
                log.info("agent %d: %d TCP flows resumed on the new relay connection", old.agent_id, moved)

    def relay_down(self, conn: ZtnaConnection, link: int = 0) -> None:
        for key, path in list(self.agents.relay.items()):
            if path.link == link:
                self.path_down(path, park=True)
                self.agents.relay.pop(key, None)
        self.streams.drop_conn(conn)

    def _expire_parked(self, now: float) -> None:
        for key, (old, since) in list(self._parked.items()):
            if now - since > RELAY_GRACE:
                del self._parked[key]
                self.tcp.drop_path(old, None)
                self.udp.drop_path(old, None)

    def agent_gone(self, agent_id: int, link: int = 0) -> None:
        path = self.agents.relay.get(owner_key(link, agent_id))
        if path is not None:
            self.path_down(path)

    def _relay_conn(self, link: int) -> ZtnaConnection | None:
        return self.relays[link].conn if link < len(self.relays) else None

    def direct_up(self, path: ReplyPath) -> None:
        """A direct connection told us its agent id (Hello): its flows may use it."""
        self.agents.add_direct(path)

    def path_down(self, path: ReplyPath, *, park: bool = False) -> None:
        """A path died: its flows move to the Agent's other live path, or end — unless the
        relay connection itself dropped (`park`): then they wait up to RELAY_GRACE for the
        relay to come back (an Intermediate restart must not end every transfer)."""
        if not path.alive:
            return
        path.alive = False
        self.agents.remove(path)
        if path.flows <= 0:
            return
        alternate = self.agents.alternate(path, self._relay_conn(path.link))
        if alternate is None and park and path.key is not None:
            self._parked[path.key] = (path, self.loop.time())  # type: ignore[union-attr]
            return
        moved = self.tcp.drop_path(path, alternate)
        self.udp.drop_path(path, alternate)
        if alternate is not None:
            log.info("%s closed: its flows continue via %s (%d TCP)", path.label, alternate.label, moved)

    def relay_datagram(self, conn: ZtnaConnection, data: bytes, link: int = 0) -> None:
        if not data or data[0] != TO_CONNECTOR:
            if data and data[0] != 0x01:      # QAD as DATAGRAM is informational
                self.stats.malformed += 1
            return
        try:
            agent_id, service, packet = decode_to_connector(data)
        except DecodeError:
            self.stats.malformed += 1
            return
        self.on_packet(self.agents.relay_path(conn, agent_id, link), service, packet)

    def relay_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool) -> None:
        self.streams.on_stream_data(conn, sid, data, end, authorize=None)

    def relay_stream_reset(self, conn: ZtnaConnection, sid: int) -> None:
        self.streams.on_stream_reset(conn, sid)

    # ------------------------------------------------------------------ the packet path
    def on_packet(self, path: ReplyPath, service_id: str, packet: memoryview) -> None:
        stats = self.stats
        stats.packets_in += 1
        svc = self.services.get(service_id)
        if svc is None:
            stats.unknown_service += 1
            return
        try:
            ip = parse_ip(packet)
            if ip.dst not in svc.vips:
                stats.not_virtual_ip += 1
                return
            proto = ip.proto
            now = self.loop.time()  # type: ignore[union-attr]
            if proto == PROTO_TCP:
                self.tcp.on_packet(path, svc, ip, packet, now)
            elif proto == PROTO_UDP:
                limit = path.max_packet()
                if ip.total_len > limit:
                    # Its reply could not come back on this path: tell the Agent's stack.
                    reply = icmp.packet_too_big(packet, src=ip.dst, mtu=limit)
                    if reply is not None and len(reply) <= limit:
                        path.send(reply)
                        stats.packet_too_big_sent += 1
                    return
                self.udp.on_packet(path, svc, ip, packet, now)
            elif proto == PROTO_ICMP or proto == PROTO_ICMPV6:
                reply = icmp.echo_reply(packet) if svc.icmp else None
                if reply is not None and path.send(reply):
                    stats.icmp_echo_replies += 1
                else:
                    stats.icmp_dropped += 1
            else:
                stats.unsupported_proto += 1
        except DecodeError:
            stats.malformed += 1
        if self.tcp.has_starved and not self._kick_scheduled:
            # A DATAGRAM arrived: ACKs may have opened the congestion window.
            self._kick_scheduled = True
            self.loop.call_soon(self._kick)  # type: ignore[union-attr]

    def _kick(self) -> None:
        self._kick_scheduled = False
        self.tcp.kick()

    # ------------------------------------------------------------------ status
    def health(self) -> tuple[bool, dict[str, Any]]:
        relay = self.relay
        # Attached to several Intermediates, any one with every service registered serves.
        ok = not self.stopping and any(link.all_registered for link in self.relays)
        detail: dict[str, Any] = {
            "relay": relay.state if relay else "none",
            "services": dict(relay.registration) if relay else {},
            "tcp_sessions": len(self.tcp), "udp_flows": len(self.udp),
            "streams": len(self.streams),
            "backends": {sid: st.snapshot() for sid, st in self.backend_health.states.items()},
        }
        if len(self.relays) > 1:
            detail["relays"] = [{"intermediate": format_address((link.host, link.port)),
                                 "state": link.state, "services": dict(link.registration)}
                                for link in self.relays]
        if self.p2p is not None:
            pa = self.p2p.public_address
            detail["p2p_port"] = self.p2p.local_port
            detail["p2p_public"] = f"{pa.ip}:{pa.port}" if pa else None
            if self.p2p.sock is not None:
                detail["p2p_qad"] = self.p2p.sock.qad_snapshot()
        return ok, detail


class _RelaySide:
    """One relay link's view of the Connector (its `LinkSink`): the same events, tagged
    with the link, whose agent ids are a namespace of their own."""

    __slots__ = ("connector", "link")

    def __init__(self, connector: Connector, link: int) -> None:
        self.connector = connector
        self.link = link

    def relay_up(self, conn: ZtnaConnection) -> None:
        self.connector.relay_up(conn, self.link)

    def relay_down(self, conn: ZtnaConnection) -> None:
        self.connector.relay_down(conn, self.link)

    def relay_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        self.connector.relay_datagram(conn, data, self.link)

    def relay_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool) -> None:
        self.connector.relay_stream_data(conn, sid, data, end)

    def relay_stream_reset(self, conn: ZtnaConnection, sid: int) -> None:
        self.connector.relay_stream_reset(conn, sid)

    def agent_gone(self, agent_id: int) -> None:
        self.connector.agent_gone(agent_id, self.link)
