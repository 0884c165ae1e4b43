"""The mesh: tunnel DATAGRAMs between members, for an Agent and a Connector attached to
different Intermediates of one cluster (docs/protocol.md §3.6, 0x32 / 0x33).

Outbound (the Agent's member): a 0x2F whose service has no Connector here is placed on a
Connector elsewhere in the cluster (`ClusterView`, rendezvous hashing over the other members'
Connectors) and sent as 0x32 over a link to that member: one QUIC connection per member,
opened on first use from this member's own client socket with its member certificate (SAN
`intermediate.ztna`), and opened again when it dies. Until its handshake completes, datagrams
wait in the native queue. A 0x33 coming back is delivered only to an Agent that this member
forwarded through that very link, and only while that Agent is connected.

Inbound (the Connector's member): a peer whose certificate says `intermediate.ztna` is a mesh
peer, nothing else (no registrations, no tunnel traffic as an Agent). For each agent ref it
forwards, this member keeps an id of its own registered in the registry as an Agent of the
services forwarded for it, so the Connector sees a normal 0x30 and the registry's reply check
(`may_reply`) applies to the remote Agent as to a local one. Those ids go when the mesh
connection goes (the Connectors get AgentGone).

TCP-carrying streams cross the same links (`ztna.intermediate.streams`): the Agent's member
opens a stream on the link headed `RelayedStreamOpen` (`RelayedNamedStreamOpen` for a name,
`RelayedStreamResume` for a stream leaving a direct path) with its Agent id, and this member
splices it to a Connector as if the remote Agent were local (`stream_from_member`).

Local Agents of a service served only on other members are told it is up (`adjust`, and
`maintain` after each view refresh when that changes).

When a local Agent leaves, each member it was forwarded to gets `AgentGone` (its ref) on the
link's control stream and drops its id for it, so its Connectors drop the Agent's flows.

Hole-punch signaling crosses the same links as `MeshSignal` control messages: a local Agent's
`PunchRequest` for a service with no Connector here goes to the member its flow would be placed
on, which runs the punch session there (its `Signaling`, with its own id for the remote Agent,
bound to the Connector it picks) and sends `PunchStart` / `PunchResult` / errors back the same
way. Only an Agent registered here for the service may ask (checked here, as on one member);
answers go only to an Agent forwarded through that very link, and the Agent's own
`PunchResult` goes back only for a session that link started for it.

Native routes: once Python has relayed a packet and the decision holds for every later
packet, it installs it in the native core (native/src/meshroute.rs) and the rest of that
traffic crosses both members without reaching Python. On the Agent's member: its 0x2F for a
service whose Connectors are all on one other member (none here) → 0x32 on that member's link,
and 0x33 for it from that link → the Agent. On the Connector's member: 0x32 for (mesh
connection, ref, service) with exactly one Connector here → 0x30 to it, and its 0x31 for our id
→ 0x33. Both ends must be on one native endpoint (links are opened from the listening socket
for this). `sync_native` (after every registry change and view refresh) removes the routes
whose decision no longer holds; a closing connection takes its routes with it natively. What
no route matches still comes up here, and is counted as before.

A remote Agent's id on the Connector's member is the Agent's own id on its member when that
is free there: an Agent id from `Hello` is derived from its certificate and instance, the
same on every member, and the Connector binds resume tokens (streams that leave a direct
path) to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ztna import limits
from ztna.cluster.presence import place
from ztna.errors import DecodeError
from ztna.intermediate.config import parse_host_port
from ztna.intermediate.registry import Notify, flow_key
from ztna.limits import NATIVE_MESH
from ztna.observe import RateLimitedLog
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.quic.maintenance import ConnectionUpkeep
from ztna.wire import (
    MESH_SIGNAL_MESSAGES,
    AgentGone,
    ErrorMessage,
    MeshSignal,
    NamedStreamOpen,
    PunchRequest,
    PunchResult,
    PunchStart,
    Register,
    RelayedNamedStreamOpen,
    RelayedStreamOpen,
    RelayedStreamResume,
    Role,
    ServiceStatus,
    StreamOpen,
    StreamResume,
    encode_control,
)
from ztna.wire.mesh import (
    MESH_FROM_CONNECTOR,
    MESH_TO_CONNECTOR,
    decode_mesh_from_connector,
    decode_mesh_to_connector,
)

log = logging.getLogger("ztna.cluster")

_TO_HEADER = bytes((MESH_TO_CONNECTOR, 0x01))
_FROM_HEADER = bytes((MESH_FROM_CONNECTOR, 0x01))


@dataclass
class MeshStats:
    forwarded: int = 0            # 0x32 sent to another member
    delivered: int = 0            # 0x33 handed to a local Agent
    received: int = 0             # 0x32 handed to a local Connector
    replied: int = 0              # 0x33 sent back to another member
    dropped_no_member: int = 0    # no Connector anywhere in the cluster
    dropped_no_connector: int = 0  # 0x32 for a service without a Connector here
    dropped_bad_reply: int = 0    # 0x33 for an Agent not forwarded through that link
    dropped_malformed: int = 0
    dropped_oversize: int = 0
    dropped_limit: int = 0        # remote Agents beyond the per-connection bound
    links_opened: int = 0
    streams_forwarded: int = 0    # Agent streams spliced onto a mesh link
    streams_received: int = 0     # mesh streams spliced to a local Connector
    signals_forwarded: int = 0    # a local Agent's punch message sent to another member
    signals_delivered: int = 0    # another member's punch message handed to a local Agent
    signals_received: int = 0     # a remote Agent's punch message run through our signaling
    signals_replied: int = 0      # our signaling's answer sent back to the Agent's member
    dropped_bad_signal: int = 0   # for an Agent not forwarded through that link, or misdirected


@dataclass(eq=False)
class MeshPeer:
    """What this member knows of one inbound mesh connection: its remote Agents."""

    conn: ZtnaConnection
    ids: dict[int, int] = field(default_factory=dict)     # agent ref -> our id


class _LinkHandler(ConnectionHandler):
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def on_handshake(self, conn: ZtnaConnection) -> None:
        log.info("mesh link %s up%s", conn.label, " (0-RTT)" if conn.early_data_accepted else "")

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        self.mesh.on_link_datagram(conn, data)

    def on_stream_data(self, conn: ZtnaConnection, stream_id: int, data: bytes, end: bool) -> None:
        streams = self.mesh.server.streams
        if streams is not None:
            streams.on_stream_data(conn, stream_id, data, end)

    def on_stream_reset(self, conn: ZtnaConnection, stream_id: int, error_code: int) -> None:
        streams = self.mesh.server.streams
        if streams is not None:
            streams.on_stream_reset(conn, stream_id, error_code)

    def on_message(self, conn: ZtnaConnection, msg: object) -> None:
        if isinstance(msg, MeshSignal):
            self.mesh.on_link_signal(conn, msg)

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None:
        self.mesh.link_closed(conn, reason)


class Mesh:
    def __init__(self, server: Any, member: Any, tls: TlsFiles, *, udp_payload: int) -> None:
        self.server = server          # the Intermediate (registry, conns, execute, ids)
        self.member = member          # its ClusterMember (view, own name)
        self.tls = tls
        self.udp_payload = udp_payload
        self.stats = MeshStats()
        self.links: dict[str, ZtnaConnection] = {}
        self._forwarded: dict[ZtnaConnection, set[int]] = {}
        self._proxies: dict[int, tuple[MeshPeer, int]] = {}    # our id -> (mesh peer, ref)
        self._endpoints: dict[bool, QuicEndpoint] = {}     # by "is IPv6"
        self._bad = RateLimitedLog(log)
        self._remote_up: set[str] = set()     # services with local Agents served elsewhere
        # Punch sessions another member runs for a local Agent: session -> (link, agent id,
        # when it started), oldest first, bounded like the signaling's own sessions.
        self._punches: dict[int, tuple[ZtnaConnection, int, float]] = {}
        # Native routes installed: (agent id, service) -> (agent conn, link, member) on the
        # Agent's side; (mesh conn, ref, service) -> (connector conn, connector id, our id)
        # on the Connector's side.
        self._out_routes: dict[tuple[int, str], tuple[ZtnaConnection, ZtnaConnection, str]] = {}
        self._in_routes: dict[tuple[ZtnaConnection, int, str], tuple[ZtnaConnection, int, int]] = {}

    # ------------------------------------------------------------------ outbound
    def forward(self, agent_id: int, service: str, packet: memoryview, data: bytes) -> bool:
        """A 0x2F (`data`, carrying `packet`) of a local Agent whose service has no Connector
        here: send it to the member its flow is placed on. False: none in the cluster."""
        own = self.member.advertise + "/"
        candidates = [n for n in self.member.view.connectors(service) if not n.startswith(own)]
        name = place(flow_key(packet), candidates)
        if name is None:
            self.stats.dropped_no_member += 1
            return False
        member = name.partition("/")[0]
        link = self._link(member)
        if link is None:
            self.stats.dropped_no_member += 1
            return True
        out = _TO_HEADER + agent_id.to_bytes(4, "big") + data[1:]
        self._forwarded.setdefault(link, set()).add(agent_id)
        if link.handshake_complete and len(out) > link.max_datagram_payload():
            self.stats.dropped_oversize += 1
            return True
        link.send_datagram(out)
        self.stats.forwarded += 1
        if NATIVE_MESH and (agent_id, service) not in self._out_routes:
            self._route_out(agent_id, service, link, member)
        return True

    # ------------------------------------------------------------------ native routes
    def _out_holds(self, agent_id: int, service: str, link: ZtnaConnection, member: str) -> bool:
        """Every packet of this Agent for `service` goes to `link`: no Connector here, all
        of the cluster's on that one member, and the link is the open one to it."""
        registry = self.server.registry
        if registry.connectors.get(service) or not registry.is_agent_of(agent_id, service):
            return False
        members = {n.partition("/")[0] for n in self._remote_connectors(service)}
        return members == {member} and self.links.get(member) is link and not link.closed

    def _route_out(self, agent_id: int, service: str, link: ZtnaConnection, member: str) -> None:
        agent = self.server.conns.get(agent_id)
        if (agent is None or agent.closed or not link.handshake_complete or agent.endpoint is not link.endpoint
                or not self._out_holds(agent_id, service, link, member)):
            return
        if agent.endpoint.native.route_mesh_out(agent.handle, service.encode("ascii"), link.handle, agent_id):
            self._out_routes[(agent_id, service)] = (agent, link, member)

    def _route_in(self, conn: ZtnaConnection, ref: int, service: str, target: ZtnaConnection,
                  target_id: int, our_id: int) -> None:
        if target.endpoint is not conn.endpoint or self.server.registry.sole_connector(service) != target_id:
            return
        if conn.endpoint.native.route_mesh_in(conn.handle, ref, service.encode("ascii"), target.handle, our_id):
            self._in_routes[(conn, ref, service)] = (target, target_id, our_id)

    def sync_native(self) -> None:
        """Remove the native routes whose decision no longer holds (after a registry change
        or a view refresh). Routes of closed connections are gone natively already."""
        for (agent_id, service), (agent, link, member) in list(self._out_routes.items()):
            if agent.closed or link.closed:
                del self._out_routes[(agent_id, service)]
            elif (self.server.conns.get(agent_id) is not agent
                  or not self._out_holds(agent_id, service, link, member)):
                del self._out_routes[(agent_id, service)]
                agent.endpoint.native.unroute_mesh_out(agent.handle, service.encode("ascii"))
        registry = self.server.registry
        for key, (target, target_id, our_id) in list(self._in_routes.items()):
            conn, ref, service = key
            if conn.closed or target.closed:
                del self._in_routes[key]
                continue
            peer = conn.user
            if (not isinstance(peer, MeshPeer) or peer.ids.get(ref) != our_id
                    or registry.sole_connector(service) != target_id
                    or self.server.conns.get(target_id) is not target
                    or not registry.is_agent_of(our_id, service)):
                del self._in_routes[key]
                conn.endpoint.native.unroute_mesh_in(conn.handle, ref, service.encode("ascii"),
                                                     target.handle, our_id)

    def _native_counts(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for ep in self.server.endpoints:
            for name, n in ep.native.stats().items():
                if name.startswith("mesh_"):
                    totals[name] = totals.get(name, 0) + int(n)
        return totals

    def signal(self, agent_id: object, msg: object) -> bool:
        """A local Agent's punch message that another member must handle: sent there (True).
        False: this member's own signaling takes it (served here, not this Agent's service,
        an unknown session, or no other member to ask)."""
        if not isinstance(agent_id, int):
            return False
        if isinstance(msg, PunchRequest):
            registry = self.server.registry
            key = agent_id.to_bytes(4, "big")      # the key the signaling picks Connectors by
            if not registry.is_agent_of(agent_id, msg.service) or registry.pick(msg.service, key) is not None:
                return False
            link = self._placed_link(msg.service, key)
            if link is None:
                return False
            self._forwarded.setdefault(link, set()).add(agent_id)
        elif isinstance(msg, PunchResult):
            entry = self._punches.get(msg.session)
            if entry is None or entry[1] != agent_id or entry[0].closed:
                return False
            link = entry[0]
            del self._punches[msg.session]
        else:
            return False
        link.send_control(encode_control(MeshSignal(agent=agent_id, message=msg)))
        self.stats.signals_forwarded += 1
        return True

    def on_link_signal(self, link: ZtnaConnection, msg: MeshSignal) -> None:
        """Another member's answer about a punch session of a local Agent."""
        ref, inner = msg.agent, msg.message
        agent = self.server.conns.get(ref)
        if agent is None or ref not in self._forwarded.get(link, ()) or isinstance(inner, PunchRequest):
            self.stats.dropped_bad_signal += 1
            self._bad.warning("mesh punch signal for an agent not forwarded through that link", f"{link.label} → {ref}")
            return
        now = self.server._now()
        if isinstance(inner, PunchStart):
            self._expire_punches(now)
            self._punches[inner.session] = (link, ref, now)
        elif isinstance(inner, (PunchResult, ErrorMessage)) and inner.session is not None:
            self._punches.pop(inner.session, None)
        agent.send_control(encode_control(inner))
        self.stats.signals_delivered += 1

    def _expire_punches(self, now: float) -> None:
        from ztna.intermediate.signaling import MAX_SESSIONS, SESSION_TTL

        punches = self._punches
        while punches:
            sid, (_link, _agent, started) = next(iter(punches.items()))
            if now - started < SESSION_TTL and len(punches) < MAX_SESSIONS:
                return
            del punches[sid]

    def _placed_link(self, service: str, key: bytes) -> ZtnaConnection | None:
        """The link to the member `key`'s flow of `service` is placed on, or None. Control
        frames written before its handshake completes wait in its stream."""
        name = place(key, self._remote_connectors(service))
        return None if name is None else self._link(name.partition("/")[0])

    def maintain(self) -> None:
        """After each view refresh: a link to every other member that holds Connectors, so
        the first packet or stream for it does not wait for a handshake; and the local Agents
        of a service served only elsewhere learn when that changes."""
        for member, record in self.member.view.records.items():
            if member != self.member.advertise and any(record.connectors.values()):
                self._link(member)
        registry = self.server.registry
        remote = {s for s in registry.agents if self._remote_connectors(s)}
        notes = []
        for service in sorted(remote ^ self._remote_up):
            if service in registry.connectors:
                continue        # served here: the registry's own announcements hold
            status = self._status(service, service in remote)
            notes += [Notify(agent, status) for agent in sorted(registry.agents.get(service, ()))]
        self._remote_up = remote
        if notes:
            self.server.execute(notes)
        self.sync_native()

    def _remote_connectors(self, service: str) -> list[str]:
        own = self.member.advertise + "/"
        return [n for n in self.member.view.connectors(service) if not n.startswith(own)]

    def _status(self, service: str, up: bool) -> ServiceStatus:
        names = self._remote_connectors(service)
        label = ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")
        return ServiceStatus(service=service, up=up, connector=label[:256] if up else None)

    def adjust(self, notes: list[Notify]) -> list[Notify]:
        """The registry says a service is down for an Agent: not while another member serves
        it (the traffic crosses the mesh)."""
        out = []
        for note in notes:
            msg = note.message
            entry = self._proxies.get(note.peer)
            if entry is not None:
                # A remote Agent's: its punch signaling goes back to its member; the rest
                # (service status) is its own member's to tell.
                if isinstance(msg, MESH_SIGNAL_MESSAGES) and not entry[0].conn.closed:
                    entry[0].conn.send_control(encode_control(MeshSignal(agent=entry[1], message=msg)))
                    self.stats.signals_replied += 1
                continue
            if isinstance(msg, ServiceStatus) and not msg.up and self._remote_connectors(msg.service):
                note = Notify(note.peer, self._status(msg.service, True))
            out.append(note)
        return out

    def _link(self, member: str) -> ZtnaConnection | None:
        link = self.links.get(member)
        if link is not None and not link.closed:
            return link
        if not self.server.endpoints:
            return None     # still starting: links go out from the listening socket
        try:
            host, port = parse_host_port(member)
        except ValueError:
            self._bad.warning("unusable member address in the cluster view", member)
            return None
        v6 = ":" in host
        endpoint = self._listening_endpoint(v6) or self._endpoints.get(v6)
        if endpoint is None:
            endpoint = self._endpoints[v6] = QuicEndpoint(bind_udp("::" if v6 else "0.0.0.0", 0))
        config = make_configuration(is_client=True, tls=self.tls, server_name=host,
                                    udp_payload=self.udp_payload)
        link = endpoint.connect((host, port), config, _LinkHandler(self))
        link.label = f"mesh→{member}"
        link.user = link.label      # the stream splicer keys its legs by (user, stream id)
        ConnectionUpkeep(link, cid_rotation=None).start()   # keepalive: links stay up
        self.links[member] = link
        self.stats.links_opened += 1
        log.info("mesh link to %s opening", member)
        return link

    def _listening_endpoint(self, v6: bool) -> QuicEndpoint | None:
        """One of this member's own listening endpoints that can reach that family: links
        from there share a native core with the Agents, so their traffic can take native
        routes (an IPv6 socket is dual-stack)."""
        if not NATIVE_MESH:
            return None     # the mesh as it was before native routes, for comparisons
        for ep in self.server.endpoints:
            if not ep._closed and (":" in str(ep.local_address[0]) or not v6):
                return ep  # type: ignore[no-any-return]
        return None

    def on_link_datagram(self, link: ZtnaConnection, data: bytes) -> None:
        try:
            ref, packet = decode_mesh_from_connector(data)
        except DecodeError as exc:
            self.stats.dropped_malformed += 1
            self._bad.warning("malformed mesh datagram", str(exc))
            return
        agent = self.server.conns.get(ref)
        if agent is None or ref not in self._forwarded.get(link, ()):
            self.stats.dropped_bad_reply += 1
            self._bad.warning("mesh reply for an agent not forwarded through that link", f"{link.label} → {ref}")
            return
        agent.send_datagram(bytes(packet))
        self.stats.delivered += 1

    def stream_link(self, agent_id: int, service: str, key: bytes) -> ZtnaConnection | None:
        """The mesh link a local Agent's stream for `service` goes out on (placed like its
        datagrams), or None when no other member has a Connector for it."""
        own = self.member.advertise + "/"
        candidates = [n for n in self.member.view.connectors(service) if not n.startswith(own)]
        name = place(key, candidates)
        if name is None:
            return None
        link = self._link(name.partition("/")[0])
        if link is None or not link.handshake_complete:
            # A stream needs the link's handshake done (stream credit): links are opened as
            # soon as a member with Connectors shows up (`maintain`), so this is the brief
            # moment before; the Agent sees UNREACHABLE and may retry.
            return None
        self.stats.streams_forwarded += 1
        return link

    def stream_from_member(self, conn: ZtnaConnection, header: object) -> tuple[int | None, object]:
        """(our id for the remote Agent, the header as the Agent's own) for a stream a mesh
        peer opened with a relayed header (0x54, 0x57, 0x59); (None, header) for anything else."""
        peer = conn.user
        if not isinstance(peer, MeshPeer) or not isinstance(
                header, (RelayedStreamOpen, RelayedNamedStreamOpen, RelayedStreamResume)):
            return None, header
        our_id = self._remote_agent(peer, header.agent_id, header.service_id)
        if our_id is None:
            return None, header
        self.stats.streams_received += 1
        if isinstance(header, RelayedNamedStreamOpen):
            return our_id, NamedStreamOpen(service_id=header.service_id, name=header.name,
                                           dst_port=header.dst_port)
        if isinstance(header, RelayedStreamResume):
            return our_id, StreamResume(service_id=header.service_id, token=header.token,
                                        received=header.received)
        return our_id, StreamOpen(service_id=header.service_id, dst_ip=header.dst_ip,
                                  dst_port=header.dst_port)

    def link_closed(self, link: ZtnaConnection, reason: str) -> None:
        self._forwarded.pop(link, None)
        if self.server.streams is not None:
            self.server.streams.peer_gone(link.user)
        for member, conn in list(self.links.items()):
            if conn is link:
                del self.links[member]
                log.info("mesh link to %s closed: %s", member, reason)

    def agent_gone(self, agent_id: int) -> None:
        """A local Agent left: every member we forwarded it to drops its id for it."""
        frame = b""
        for link, agents in self._forwarded.items():
            if agent_id in agents:
                agents.discard(agent_id)
                frame = frame or encode_control(AgentGone(agent=agent_id))
                link.send_control(frame)

    # ------------------------------------------------------------------ inbound
    def member_up(self, conn: ZtnaConnection) -> None:
        conn.user = MeshPeer(conn)
        label = conn.identity.common_name if conn.identity is not None else "?"
        conn.label = f"mesh←{label}"
        log.info("mesh peer %s connected", label)

    def on_member_signal(self, conn: ZtnaConnection, msg: MeshSignal) -> None:
        """A mesh peer's punch message of one of its Agents: run through our signaling, as
        that Agent's (a request registers our id for it as an Agent of the service, which
        its member checked before forwarding)."""
        peer = conn.user
        inner = msg.message
        signaling = self.server.signaling
        our_id: int | None = None
        if isinstance(peer, MeshPeer):
            if isinstance(inner, PunchRequest):
                our_id = self._remote_agent(peer, msg.agent, inner.service)
            elif isinstance(inner, PunchResult):
                our_id = peer.ids.get(msg.agent)
        if our_id is None or signaling is None:
            self.stats.dropped_bad_signal += 1
            self._bad.warning("mesh punch signal refused", f"{conn.label} → {msg.agent}")
            return
        self.stats.signals_received += 1
        self.server.execute(signaling.handle(our_id, inner, self.server.registry, now=self.server._now()))

    def member_down(self, conn: ZtnaConnection) -> bool:
        """True when `conn` was a mesh peer (its remote Agents are gone now)."""
        peer = conn.user
        if not isinstance(peer, MeshPeer):
            return False
        notes = []
        signaling = self.server.signaling
        for our_id in peer.ids.values():
            self._proxies.pop(our_id, None)
            notes += self.server.registry.remove_peer(our_id)
            if signaling is not None:
                notes += signaling.peer_gone(our_id)
        self.server.execute(notes)
        if self.server.streams is not None:
            self.server.streams.peer_gone(peer)
        log.info("mesh peer %s gone (%d remote agents)", conn.label, len(peer.ids))
        return True

    def on_member_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        peer = conn.user
        if not isinstance(peer, MeshPeer) or data[0] != MESH_TO_CONNECTOR:
            self.stats.dropped_malformed += 1
            self._bad.warning("mesh datagram from a peer that is not a mesh peer", conn.label)
            return
        try:
            ref, service, packet = decode_mesh_to_connector(data)
        except DecodeError as exc:
            self.stats.dropped_malformed += 1
            self._bad.warning("malformed mesh datagram", str(exc))
            return
        registry = self.server.registry
        our_id = self._remote_agent(peer, ref, service)
        if our_id is None:
            return
        target_id = registry.connector_for(service, packet, now=self.server._now())
        target = self.server.conns.get(target_id) if target_id is not None else None
        if target is None:
            self.stats.dropped_no_connector += 1
            self._bad.warning("mesh datagram for a service without a connector here", service)
            return
        out = b"\x30\x01" + our_id.to_bytes(4, "big") + data[6:]
        if len(out) > target.max_datagram_payload():
            self.stats.dropped_oversize += 1
            return
        target.send_datagram(out)
        self.stats.received += 1
        if NATIVE_MESH and (conn, ref, service) not in self._in_routes:
            self._route_in(conn, ref, service, target, target_id, our_id)

    def _remote_agent(self, peer: MeshPeer, ref: int, service: str) -> int | None:
        """Our id for agent `ref` of that mesh peer, registered for `service` (None beyond
        `limits.MESH_REMOTE_AGENTS` per mesh connection: the table stays bounded)."""
        registry = self.server.registry
        our_id = peer.ids.get(ref)
        if our_id is None:
            if len(peer.ids) >= limits.MESH_REMOTE_AGENTS:
                self.stats.dropped_limit += 1
                self._bad.warning("remote agents per mesh connection at their limit", conn_label(peer))
                return None
            srv = self.server
            # The Agent's own id when it is free here (see the module's docstring).
            free = ref != 0 and ref not in srv.conns and ref not in registry.peers
            our_id = ref if free else srv.new_peer_id()
            registry.add_peer(our_id, _RemoteAgent(), f"{peer.conn.label}/agent#{ref}")
            peer.ids[ref] = our_id
            self._proxies[our_id] = (peer, ref)
        if not registry.is_agent_of(our_id, service):
            _reply, notes = registry.register(our_id, Register(role=Role.AGENT, service_id=service))
            self.server.execute(notes)
        return int(our_id)

    def remote_agent_gone(self, conn: ZtnaConnection, ref: int) -> None:
        """The member behind `conn` says its agent `ref` left: drop our id for it (its
        Connectors get AgentGone from the registry)."""
        peer = conn.user
        if not isinstance(peer, MeshPeer):
            return
        our_id = peer.ids.pop(ref, None)
        if our_id is None:
            return
        self._proxies.pop(our_id, None)
        notes = self.server.registry.remove_peer(our_id)
        if self.server.signaling is not None:
            notes += self.server.signaling.peer_gone(our_id)
        self.server.execute(notes)
        if self.server.streams is not None:
            self.server.streams.peer_gone(our_id)

    def reply(self, our_id: int, packet: memoryview) -> bool:
        """A Connector's 0x31 to a remote Agent (already checked by `may_reply`)."""
        entry = self._proxies.get(our_id)
        if entry is None:
            return False
        peer, ref = entry
        if peer.conn.closed:
            return False
        out = _FROM_HEADER + ref.to_bytes(4, "big") + bytes(packet)
        if len(out) > peer.conn.max_datagram_payload():
            self.stats.dropped_oversize += 1
            return True
        peer.conn.send_datagram(out)
        self.stats.replied += 1
        return True

    # ------------------------------------------------------------------ lifecycle, metrics
    def close(self) -> None:
        for link in list(self.links.values()):
            link.close(0, "member shutting down")
        for endpoint in self._endpoints.values():
            endpoint.flush()
            endpoint.shutdown_socket()
        self._endpoints.clear()

    def metrics(self) -> list[tuple[str, str, str, float, dict[str, str] | None]]:
        s = self.stats
        native = self._native_counts()
        out: list[tuple[str, str, str, float, dict[str, str] | None]] = []
        for direction in ("forwarded", "delivered", "received", "replied"):
            fast = native.get(f"mesh_{direction}", 0)
            out.append(("ztna_mesh_datagrams_total", "counter",
                        "Tunnel DATAGRAMs across the mesh (native routes and Python)",
                        getattr(s, direction) + fast, {"direction": direction}))
            out.append(("ztna_mesh_native_datagrams_total", "counter",
                        "Tunnel DATAGRAMs across the mesh on native routes", fast, {"direction": direction}))
        out += [
            ("ztna_mesh_links", "gauge", "Open mesh links to other members",
             sum(1 for link in self.links.values() if not link.closed), None),
            ("ztna_mesh_links_opened_total", "counter", "Mesh links opened", s.links_opened, None),
            ("ztna_mesh_streams_total", "counter", "TCP-carrying streams across the mesh",
             s.streams_forwarded, {"direction": "forwarded"}),
            ("ztna_mesh_streams_total", "counter", "TCP-carrying streams across the mesh",
             s.streams_received, {"direction": "received"}),
            ("ztna_mesh_native_routes", "gauge", "Mesh routes installed in the native core",
             len(self._out_routes) + len(self._in_routes), None),
        ]
        for direction in ("forwarded", "delivered", "received", "replied"):
            out.append(("ztna_mesh_signals_total", "counter", "Hole-punch signaling across the mesh",
                        getattr(s, f"signals_{direction}"), {"direction": direction}))
        for reason in ("no_member", "no_connector", "bad_reply", "malformed", "oversize", "limit",
                       "bad_signal"):
            out.append(("ztna_mesh_dropped_total", "counter", "Mesh datagrams dropped by reason",
                        getattr(s, f"dropped_{reason}"), {"reason": reason}))
        return out


def conn_label(peer: MeshPeer) -> str:
    return peer.conn.label


class _RemoteAgent:
    """Authorization of a remote Agent: its own member checked its certificate before it
    forwarded anything, and the mesh peer proved its membership (intermediate.ztna)."""

    scoped = True

    def allows(self, role: str, service: str) -> bool:
        return role == "agent"
