"""The Intermediate's datagram relay: where each tunnel DATAGRAM goes, and why one is dropped.

Agents send 0x2F (service id + IP packet); the relay forwards it as 0x30 (agent id + packet)
to the Connector the registry picks for that service and flow. Connectors answer with 0x31
(agent id + packet); the relay hands the bare packet to exactly that Agent, and only if the
registry says this Connector serves one of its services. Everything else is a drop, counted
under one `DropReason` (and logged, rate-limited, by the driver).

Where the decision is the same for every packet (an Agent of a service with exactly one
Connector, both on one native endpoint) it is installed as routes in the native core, which
then forwards those DATAGRAMs without asking Python: `routes_for` derives the routes the
registry justifies, `RouteTable` keeps them in line with registry changes, and
`apply_routes` hands the difference to the endpoints.

Pure: the clock is passed in, connections are seen through small Protocols, and the
decisions come back as values for the driver (`ztna.intermediate.server`) to carry out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from ztna.errors import DecodeError
from ztna.intermediate.registry import Registry
from ztna.wire import (
    FROM_CONNECTOR,
    SERVICE_DATAGRAM,
    Register,
    decode_from_connector,
    decode_registration,
    decode_service_datagram,
    to_connector_from_service_datagram,
)
from ztna.wire.mesh import MESH_FROM_CONNECTOR, MESH_TO_CONNECTOR
from ztna.wire.registration import REGISTER_AGENT, REGISTER_CONNECTOR


class DropReason(StrEnum):
    UNREGISTERED = "unregistered"    # 0x2F from a peer not registered as Agent of the service
    NO_CONNECTOR = "no_connector"    # no Connector for the service, here or on another member
    BAD_REPLY = "bad_reply"          # 0x31 to an Agent the Connector does not serve, or gone
    OVERSIZE = "oversize"            # larger than the next hop's DATAGRAM limit
    MALFORMED = "malformed"          # does not decode
    UNKNOWN_TYPE = "unknown_type"    # a first byte the relay does not know


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

    def drop(self, reason: DropReason) -> None:
        name = f"dropped_{reason.value}"
        setattr(self, name, getattr(self, name) + 1)

    def dropped(self, reason: DropReason) -> int:
        return int(getattr(self, f"dropped_{reason.value}"))


class RelayPeer(Protocol):
    """What the relay needs of a connection it forwards to."""

    def max_datagram_payload(self) -> int: ...
    def send_datagram(self, data: bytes) -> object: ...


# ------------------------------------------------------------------ decisions
@dataclass(slots=True)
class Forward:
    """Send `payload` as one DATAGRAM to peer `target`, whose connection is `conn` (already
    counted as relayed)."""

    target: int
    payload: bytes
    conn: RelayPeer = field(compare=False, repr=False)


@dataclass(slots=True)
class Drop:
    """Dropped and counted under `reason`; `message` (with `detail`) is the log line, if any."""

    reason: DropReason
    message: str = ""
    detail: str = ""


@dataclass(slots=True)
class Unregistered:
    """0x2F for a service the peer has not registered for (yet): the driver may hold it
    until the registration in the same flight arrives, else `Relay.refuse_unregistered`."""

    service: str
    data: bytes | memoryview


@dataclass(slots=True)
class NoLocalConnector:
    """0x2F for a service without a Connector on this member: another member's (the mesh),
    else `Relay.no_connector`."""

    agent: int
    service: str
    packet: memoryview
    data: bytes | memoryview


@dataclass(slots=True)
class AgentElsewhere:
    """0x31 to an Agent the Connector may answer but which is not connected here: another
    member's Agent (the mesh), else gone (`Relay.reply_gone`)."""

    agent: int
    packet: memoryview


@dataclass(slots=True)
class Registration:
    """A registration sent as a DATAGRAM (the original's carriage); answered the same way."""

    message: Register


@dataclass(slots=True)
class MemberDatagram:
    """0x32/0x33 from another member of the cluster, for the mesh (unknown without one)."""


Decision = Forward | Drop | Unregistered | NoLocalConnector | AgentElsewhere | Registration | MemberDatagram


class Relay:
    """The relay's decisions for the DATAGRAMs of the connections in `peers` (peer id →
    connection, the driver's live table), with the counts behind ztna_relay_*."""

    __slots__ = ("registry", "peers", "clock", "stats")

    def __init__(self, registry: Registry, peers: Mapping[int, RelayPeer], clock: Callable[[], float]) -> None:
        self.registry = registry
        self.peers = peers
        self.clock = clock      # read only where a decision needs the time (flow pins)
        self.stats = RelayStats()

    def decide(self, peer_id: int, label: str, data: bytes | memoryview) -> Decision | None:
        """What to do with a DATAGRAM (non-empty) from peer `peer_id` (`label` names it in
        log lines); None: nothing to do (a registration reply sent to us)."""
        kind = data[0]
        if kind == SERVICE_DATAGRAM:
            try:
                service, packet = decode_service_datagram(data)
            except DecodeError as exc:
                return self._drop(DropReason.MALFORMED, "malformed 0x2F datagram", str(exc))
            if not self.registry.is_agent_of(peer_id, service):
                return Unregistered(service, data)
            target_id = self.registry.connector_for(service, packet, now=self.clock())
            if target_id is None or (target := self.peers.get(target_id)) is None:
                return NoLocalConnector(peer_id, service, packet, data)
            return self.forward(target_id, target, to_connector_from_service_datagram(peer_id, data))
        if kind == FROM_CONNECTOR:
            try:
                agent_id, packet = decode_from_connector(data)
            except DecodeError as exc:
                return self._drop(DropReason.MALFORMED, "malformed 0x31 datagram", str(exc))
            if not self.registry.may_reply(peer_id, agent_id):
                return self._drop(DropReason.BAD_REPLY, "0x31 reply to an agent this connector does not serve",
                                  f"{label} → {agent_id}")
            agent = self.peers.get(agent_id)
            if agent is None:
                return AgentElsewhere(agent_id, packet)
            return self.forward(agent_id, agent, bytes(packet))
        if kind in (REGISTER_AGENT, REGISTER_CONNECTOR):
            try:
                msg = decode_registration(data)
            except DecodeError:
                return self._drop(DropReason.MALFORMED)
            return Registration(msg) if isinstance(msg, Register) else None
        if kind in (MESH_TO_CONNECTOR, MESH_FROM_CONNECTOR):
            return MemberDatagram()
        return self.unknown_type(kind, label)

    def forward(self, target_id: int, target: RelayPeer, payload: bytes) -> Forward | Drop:
        """Forward to `target` if it fits that connection's DATAGRAM limit."""
        limit = target.max_datagram_payload()
        if len(payload) > limit:
            return self._drop(DropReason.OVERSIZE, "relayed datagram larger than the next hop allows",
                              f"{len(payload)} > {limit}")
        stats = self.stats
        stats.relayed_datagrams += 1
        stats.relayed_bytes += len(payload)
        return Forward(target_id, payload, target)

    # The drops the driver decides (after trying a hold or the mesh).
    def refuse_unregistered(self, label: str, service: str) -> Drop:
        return self._drop(DropReason.UNREGISTERED, "0x2F from a peer not registered as agent", f"{label} → {service}")

    def no_connector(self, service: str) -> Drop:
        return self._drop(DropReason.NO_CONNECTOR, "no connector for service", service)

    def reply_gone(self) -> Drop:
        return self._drop(DropReason.BAD_REPLY)

    def unknown_type(self, kind: int, label: str) -> Drop:
        return self._drop(DropReason.UNKNOWN_TYPE, "datagram of unknown type", f"0x{kind:02x} from {label}")

    def _drop(self, reason: DropReason, message: str = "", detail: str = "") -> Drop:
        self.stats.drop(reason)
        return Drop(reason, message, detail)


# ------------------------------------------------------------------ native routes
class RoutedPeer(Protocol):
    """What a route names of a connection: its endpoint (routes stay on one) and handle."""

    @property
    def endpoint(self) -> Any: ...
    @property
    def handle(self) -> int: ...
    @property
    def closed(self) -> bool: ...


class AgentRoute(NamedTuple):
    """0x2F from the Agent's connection for `service` → 0x30 with `agent_id` to the Connector."""

    endpoint: Any
    agent: int
    service: bytes
    connector: int
    agent_id: int


class ReplyRoute(NamedTuple):
    """0x31 from the Connector's connection for `agent_id` → the bare packet to the Agent."""

    endpoint: Any
    connector: int
    agent_id: int
    agent: int


Route = AgentRoute | ReplyRoute


def routes_for(registry: Registry, peers: Mapping[int, RoutedPeer], service: str, agent_id: int) -> frozenset[Route]:
    """The routes the registry justifies for one Agent of one service: none unless the
    service has exactly one Connector and both connections are open on one endpoint. A route
    only names what the registry allows: the Agent's own connection → the service's
    Connector, and replies → that Agent id."""
    connector_id = registry.sole_connector(service)
    connector = peers.get(connector_id) if connector_id is not None else None
    agent = peers.get(agent_id)
    if (connector is None or agent is None or connector.closed or agent.closed
            or agent is connector or agent.endpoint is not connector.endpoint
            or not registry.is_agent_of(agent_id, service)):
        return frozenset()
    ep = connector.endpoint
    return frozenset((AgentRoute(ep, agent.handle, service.encode("ascii"), connector.handle, agent_id),
                      ReplyRoute(ep, connector.handle, agent_id, agent.handle)))


class RouteChanges(NamedTuple):
    gone: list[Route]
    new: list[Route]


class RouteTable:
    """The native routes installed, per (service, agent id), the Agents routed per service,
    and a count per route (a reply route may be justified by several services)."""

    __slots__ = ("routes", "routed", "refs")

    def __init__(self) -> None:
        self.routes: dict[tuple[str, int], frozenset[Route]] = {}
        self.routed: dict[str, set[int]] = {}
        self.refs: dict[Route, int] = {}

    def sync(self, changed: Iterable[tuple[str, int | None]], agents_of: Callable[[str], Iterable[int]],
             want: Callable[[str, int], frozenset[Route]]) -> RouteChanges:
        """Bring the table in line with registry changes ((service, agent id), or (service,
        None) when the pool changed: every Agent of the service, routed or not)."""
        keys: set[tuple[str, int]] = set()
        for service, agent_id in changed:
            if agent_id is not None:
                keys.add((service, agent_id))
            else:
                keys.update((service, a) for a in self.routed.get(service, ()))
                keys.update((service, a) for a in agents_of(service))
        refs = self.refs
        out = RouteChanges([], [])
        for key in keys:
            service, agent_id = key
            old = self.routes.pop(key, frozenset())
            wanted = want(service, agent_id)
            routed = self.routed.setdefault(service, set())
            if wanted:
                self.routes[key] = wanted
                routed.add(agent_id)
            else:
                routed.discard(agent_id)
                if not routed:
                    del self.routed[service]
            for route in old - wanted:
                refs[route] -= 1
                if not refs[route]:
                    del refs[route]
                    out.gone.append(route)
            for route in wanted - old:
                refs[route] = refs.get(route, 0) + 1
                if refs[route] == 1:
                    out.new.append(route)
        return out


def apply_routes(changes: RouteChanges) -> None:
    """Install the difference in the endpoints' native cores. Removals first: a new route
    may reuse the key (connector, agent id) of a gone one."""
    for route in changes.gone:
        native = route.endpoint.native
        if isinstance(route, AgentRoute):
            native.unroute_agent(route.agent, route.service)
        else:
            native.unroute_reply(route.connector, route.agent_id)
    for route in changes.new:
        native = route.endpoint.native
        if isinstance(route, AgentRoute):
            native.route_agent(route.agent, route.service, route.connector, route.agent_id)
        else:
            native.route_reply(route.connector, route.agent_id, route.agent)
