"""The Intermediate's relay decisions (`ztna.intermediate.relay`), in memory: an Agent's and a
Connector's connections as plain peers with a DATAGRAM limit, no sockets, no clock. Every
forward is checked byte for byte, every drop under its reason."""

from __future__ import annotations

from dataclasses import dataclass

from test_registry import Scoped

from ztna.intermediate.metrics import intermediate_metrics
from ztna.intermediate.registry import Registry
from ztna.intermediate.relay import (
    AgentElsewhere,
    AgentRoute,
    Drop,
    DropReason,
    Forward,
    MemberDatagram,
    NoLocalConnector,
    Registration,
    Relay,
    RelayStats,
    ReplyRoute,
    RouteTable,
    Unregistered,
    routes_for,
)
from ztna.netstack.packets import build_udp_packet, ip_to_bytes
from ztna.wire import (
    Register,
    RegistrationAck,
    Role,
    encode_from_connector,
    encode_registration,
    encode_service_datagram,
    encode_to_connector,
)
from ztna.wire.mesh import encode_mesh_from_connector


@dataclass(eq=False)
class Conn:
    """One connection as the relay sees it: its DATAGRAM limit, endpoint and handle."""

    handle: int
    endpoint: object
    limit: int = 1200
    closed: bool = False

    def max_datagram_payload(self) -> int:
        return self.limit


EP = object()


def clock() -> float:
    return 0.0
AGENT, OTHER_AGENT, CONNECTOR, OTHER_CONNECTOR = 1, 2, 10, 11


def packet(sport: int = 5353, body: bytes = b"query") -> bytes:
    return build_udp_packet(ip_to_bytes("10.0.0.1"), ip_to_bytes("10.1.0.1"), sport, 53, body)


def world() -> tuple[Registry, dict[int, Conn], Relay]:
    """Agent 1 and Connector 10 serve "web"; Agent 2 and Connector 11 serve "db"."""
    reg = Registry()
    conns: dict[int, Conn] = {}
    for peer, grants in ((AGENT, {"agent": ["web"]}), (OTHER_AGENT, {"agent": ["db"]}),
                         (CONNECTOR, {"connector": ["web"]}), (OTHER_CONNECTOR, {"connector": ["db"]})):
        reg.add_peer(peer, Scoped(**grants), f"peer{peer}")
        conns[peer] = Conn(handle=100 + peer, endpoint=EP)
    for peer, role, service in ((CONNECTOR, Role.CONNECTOR, "web"), (OTHER_CONNECTOR, Role.CONNECTOR, "db"),
                                (AGENT, Role.AGENT, "web"), (OTHER_AGENT, Role.AGENT, "db")):
        assert isinstance(reg.register(peer, Register(role=role, service_id=service))[0], RegistrationAck)
    return reg, conns, Relay(reg, conns, clock)


def test_agent_to_connector_and_reply_byte_exact() -> None:
    _, conns, relay = world()
    pkt = packet()
    d = relay.decide(AGENT, "agent", encode_service_datagram("web", pkt))
    assert d == Forward(CONNECTOR, encode_to_connector(AGENT, "web", pkt), conns[CONNECTOR])
    assert isinstance(d, Forward) and d.conn is conns[CONNECTOR]
    assert isinstance(d, Forward) and d.payload[:6] == b"\x30\x01\x00\x00\x00\x01"   # 0x30 v1, agent 1
    reply = packet(53, b"answer")
    d = relay.decide(CONNECTOR, "connector", encode_from_connector(AGENT, reply))
    assert d == Forward(AGENT, reply, conns[AGENT]) and d.conn is conns[AGENT]
    assert relay.stats.relayed_datagrams == 2
    assert relay.stats.relayed_bytes == len(encode_to_connector(AGENT, "web", pkt)) + len(reply)


def test_isolation_between_agents_and_services() -> None:
    _, conns, relay = world()
    pkt = packet()
    # The "db" Connector may not answer the "web" Agent, nor the "web" Connector the "db" Agent.
    d = relay.decide(OTHER_CONNECTOR, "c11", encode_from_connector(AGENT, pkt))
    assert d == Drop(DropReason.BAD_REPLY, "0x31 reply to an agent this connector does not serve", "c11 → 1")
    d = relay.decide(CONNECTOR, "c10", encode_from_connector(OTHER_AGENT, pkt))
    assert isinstance(d, Drop) and d.reason is DropReason.BAD_REPLY
    # An Agent cannot send into a service it has not registered for: the driver may hold it
    # (the registration may be on its way), else it is refused and counted.
    data = encode_service_datagram("db", pkt)
    assert relay.decide(AGENT, "a1", data) == Unregistered("db", data)
    assert relay.refuse_unregistered("a1", "db") == Drop(
        DropReason.UNREGISTERED, "0x2F from a peer not registered as agent", "a1 → db")
    # Each Agent's packets reach only its own service's Connector, with its own id.
    d = relay.decide(OTHER_AGENT, "a2", encode_service_datagram("db", pkt))
    assert d == Forward(OTHER_CONNECTOR, encode_to_connector(OTHER_AGENT, "db", pkt), conns[OTHER_CONNECTOR])
    assert d.conn is conns[OTHER_CONNECTOR]
    assert relay.stats.dropped_bad_reply == 2 and relay.stats.dropped_unregistered == 1
    assert relay.stats.relayed_datagrams == 1


def test_every_drop_is_counted_under_its_reason() -> None:
    reg, conns, relay = world()
    pkt = packet()
    # malformed: a 0x2F whose service id runs past the end, a 0x31 without its agent id,
    # and a registration that does not decode
    d = relay.decide(AGENT, "a1", b"\x2f\x09web")
    assert isinstance(d, Drop) and d.reason is DropReason.MALFORMED and d.message == "malformed 0x2F datagram"
    d = relay.decide(CONNECTOR, "c10", b"\x31\x00")
    assert isinstance(d, Drop) and d.reason is DropReason.MALFORMED and d.message == "malformed 0x31 datagram"
    reg_type = encode_registration(Register(role=Role.AGENT, service_id="web"))[0]
    assert relay.decide(AGENT, "a1", bytes((reg_type, 0xFF))) == Drop(DropReason.MALFORMED)
    # unknown type
    assert relay.decide(AGENT, "a1", b"\x7fxyz") == Drop(
        DropReason.UNKNOWN_TYPE, "datagram of unknown type", "0x7f from a1")
    # oversize: the Connector's connection takes 40 bytes at most
    conns[CONNECTOR].limit = 40
    d = relay.decide(AGENT, "a1", encode_service_datagram("web", pkt))
    out = len(encode_to_connector(AGENT, "web", pkt))
    assert d == Drop(DropReason.OVERSIZE, "relayed datagram larger than the next hop allows", f"{out} > 40")
    # no Connector: the pool is empty once its Connector leaves; the mesh may have one,
    # else the driver counts it
    reg.remove_peer(CONNECTOR)
    data = encode_service_datagram("web", pkt)
    d = relay.decide(AGENT, "a1", data)
    assert isinstance(d, NoLocalConnector) and (d.agent, d.service, bytes(d.packet)) == (AGENT, "web", pkt)
    assert relay.no_connector("web") == Drop(DropReason.NO_CONNECTOR, "no connector for service", "web")
    # a reply to an Agent the Connector serves but which is not connected here (gone, or
    # another member's): the mesh may take it, else it is a bad reply, counted quietly
    del conns[OTHER_AGENT]
    d = relay.decide(OTHER_CONNECTOR, "c11", encode_from_connector(OTHER_AGENT, pkt))
    assert isinstance(d, AgentElsewhere) and d.agent == OTHER_AGENT and bytes(d.packet) == pkt
    assert relay.reply_gone() == Drop(DropReason.BAD_REPLY)
    # unregistered (after the driver's hold gave up)
    assert isinstance(relay.decide(OTHER_CONNECTOR, "c11", encode_service_datagram("db", pkt)),
                      Unregistered)
    relay.refuse_unregistered("c11", "db")
    assert {r: relay.stats.dropped(r) for r in DropReason} == {
        DropReason.UNREGISTERED: 1, DropReason.NO_CONNECTOR: 1, DropReason.BAD_REPLY: 1,
        DropReason.OVERSIZE: 1, DropReason.MALFORMED: 3, DropReason.UNKNOWN_TYPE: 1}
    assert relay.stats.relayed_datagrams == 0
    # ... and /metrics shows each reason (native drops added where the core has its own)
    rows = intermediate_metrics(_View(relay, reg, {"relay_dropped_oversize": 2, "relay_dropped_no_target": 4}), 5.0)
    drops = {r[4]["reason"]: r[3] for r in rows if r[0] == "ztna_relay_dropped_total" and r[4]}
    assert drops == {"unregistered": 1, "no_connector": 1, "bad_reply": 1, "oversize": 3, "malformed": 3,
                     "unknown_type": 1, "no_target": 4}


@dataclass
class _View:
    relay: Relay
    registry: Registry
    totals: dict[str, int]
    started_at: float = 0.0
    connection_count: int = 4
    ticket_stats: object = None

    @property
    def stats(self) -> RelayStats:
        return self.relay.stats

    def endpoint_totals(self) -> dict[str, int]:
        return self.totals

    def row_sources(self) -> list[object]:
        return []


def test_registration_and_member_datagrams_go_to_the_driver() -> None:
    _, _, relay = world()
    msg = Register(role=Role.AGENT, service_id="web")
    assert relay.decide(AGENT, "a1", encode_registration(msg)) == Registration(msg)
    # only requests come this way: an Ack sent to the Intermediate is of no known type
    assert relay.decide(AGENT, "a1", encode_registration(RegistrationAck("web"))) == Drop(
        DropReason.UNKNOWN_TYPE, "datagram of unknown type", "0x12 from a1")
    assert relay.decide(AGENT, "a1", encode_mesh_from_connector(7, packet())) == MemberDatagram()
    assert relay.unknown_type(0x33, "a1").reason is DropReason.UNKNOWN_TYPE


def test_unrouted_flows_are_decided_per_packet_by_the_registry() -> None:
    """Two Connectors for one service: no native route (a per-flow choice); each flow keeps
    the Connector it got while it is live."""
    reg, conns, relay = world()
    reg.add_peer(12, Scoped(connector=["web"]), "c12")
    conns[12] = Conn(handle=112, endpoint=EP)
    reg.register(12, Register(role=Role.CONNECTOR, service_id="web"))
    assert routes_for(reg, conns, "web", AGENT) == frozenset()
    targets = set()
    for sport in range(1000, 1032):
        d = relay.decide(AGENT, "a1", encode_service_datagram("web", packet(sport)))
        assert isinstance(d, Forward)
        again = relay.decide(AGENT, "a1", encode_service_datagram("web", packet(sport)))
        assert isinstance(again, Forward) and again.target == d.target
        targets.add(d.target)
    assert targets == {CONNECTOR, 12}


def test_routes_for_one_connector_on_one_endpoint() -> None:
    reg, conns, _ = world()
    a, c = conns[AGENT], conns[CONNECTOR]
    assert routes_for(reg, conns, "web", AGENT) == {
        AgentRoute(EP, a.handle, b"web", c.handle, AGENT), ReplyRoute(EP, c.handle, AGENT, a.handle)}
    # not for a service the Agent does not use, nor across two endpoints, nor when closed
    assert routes_for(reg, conns, "db", AGENT) == frozenset()
    c.endpoint = object()
    assert routes_for(reg, conns, "web", AGENT) == frozenset()
    c.endpoint, c.closed = EP, True
    assert routes_for(reg, conns, "web", AGENT) == frozenset()


def _sync(table: RouteTable, reg: Registry, conns: dict[int, Conn]) -> tuple[set[object], set[object]]:
    changes = table.sync(reg.take_changed(), lambda s: reg.agents.get(s, ()),
                         lambda s, a: routes_for(reg, conns, s, a))
    assert len(set(changes.gone)) == len(changes.gone) and len(set(changes.new)) == len(changes.new)
    return set(changes.gone), set(changes.new)


def test_route_table_installs_and_removes_with_the_registry() -> None:
    reg, conns, _ = world()
    table = RouteTable()
    a, c, c2 = conns[AGENT], conns[CONNECTOR], conns[OTHER_CONNECTOR]
    web = {AgentRoute(EP, a.handle, b"web", c.handle, AGENT), ReplyRoute(EP, c.handle, AGENT, a.handle)}
    gone, new = _sync(table, reg, conns)
    assert gone == set() and web <= new and len(new) == 4     # both services' Agents
    assert _sync(table, reg, conns) == (set(), set())        # nothing changed, nothing to do
    # A second Connector joins "web": the choice is per flow now, the routes go.
    reg.add_peer(12, Scoped(connector=["web"]), "c12")
    conns[12] = Conn(handle=112, endpoint=EP)
    reg.register(12, Register(role=Role.CONNECTOR, service_id="web"))
    assert _sync(table, reg, conns) == (web, set())
    # It leaves again: back to one Connector, the routes come back.
    reg.remove_peer(12)
    assert _sync(table, reg, conns) == (set(), web)
    # The Agent goes: its routes go, the other service's stay.
    reg.remove_peer(AGENT)
    assert _sync(table, reg, conns) == (web, set())
    assert set(table.refs) == {AgentRoute(EP, conns[OTHER_AGENT].handle, b"db", c2.handle, OTHER_AGENT),
                               ReplyRoute(EP, c2.handle, OTHER_AGENT, conns[OTHER_AGENT].handle)}


def test_a_reply_route_shared_by_two_services_stays_while_one_needs_it() -> None:
    reg = Registry()
    conns = {1: Conn(handle=101, endpoint=EP), 10: Conn(handle=110, endpoint=EP)}
    reg.add_peer(1, Scoped(agent=["web", "db"]), "a1")
    reg.add_peer(10, Scoped(connector=["web", "db"]), "c10")
    for service in ("web", "db"):
        reg.register(10, Register(role=Role.CONNECTOR, service_id=service))
        reg.register(1, Register(role=Role.AGENT, service_id=service))
    table = RouteTable()
    reply = ReplyRoute(EP, 110, 1, 101)
    gone, new = _sync(table, reg, conns)
    assert new == {AgentRoute(EP, 101, b"web", 110, 1), AgentRoute(EP, 101, b"db", 110, 1), reply}
    assert table.refs[reply] == 2
    # "db" gets a second Connector: its agent route goes, the reply route stays for "web".
    reg.add_peer(11, Scoped(connector=["db"]), "c11")
    conns[11] = Conn(handle=111, endpoint=EP)
    reg.register(11, Register(role=Role.CONNECTOR, service_id="db"))
    assert _sync(table, reg, conns) == ({AgentRoute(EP, 101, b"db", 110, 1)}, set())
    assert table.refs[reply] == 1
