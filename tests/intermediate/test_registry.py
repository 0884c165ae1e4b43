"""ztna.intermediate.registry: pure registration, routing and notification rules."""

from __future__ import annotations

from ztna.intermediate.registry import AllowAll, Notify, Registry, flow_key
from ztna.netstack.packets import build_udp_packet, ip_to_bytes
from ztna.wire import (
    AgentGone,
    NackStatus,
    Register,
    RegistrationAck,
    RegistrationNack,
    Role,
    ServiceStatus,
)


class Scoped:
    scoped = True

    def __init__(self, **grants: list[str]) -> None:
        self.grants = grants

    def allows(self, role: str, service: str) -> bool:
        return service in self.grants.get(role, [])


def reg(role: Role, service: str) -> Register:
    return Register(role=role, service_id=service)


def udp(sport: int) -> bytes:
    return build_udp_packet(ip_to_bytes("10.0.0.1"), ip_to_bytes("10.1.0.1"), sport, 53, b"q")


def setup() -> Registry:
    r = Registry(max_registrations=3)
    r.add_peer(1, Scoped(agent=["web", "db"]), "agent1")
    r.add_peer(2, Scoped(agent=["web"]), "agent2")
    r.add_peer(10, Scoped(connector=["web", "db"]), "c10")
    r.add_peer(11, Scoped(connector=["web"]), "c11")
    return r


def test_ack_nack_and_limits() -> None:
    r = setup()
    assert r.register(1, reg(Role.AGENT, "web")) == (RegistrationAck("web"), [Notify(1, ServiceStatus("web", False))])
    reply, _ = r.register(1, reg(Role.AGENT, "ssh"))
    assert reply == RegistrationNack("ssh", NackStatus.NOT_AUTHORIZED)
    reply, _ = r.register(1, reg(Role.CONNECTOR, "web"))
    assert reply == RegistrationNack("web", NackStatus.NOT_AUTHORIZED)
    reply, _ = r.register(99, reg(Role.AGENT, "web"))
    assert reply == RegistrationNack("web", NackStatus.INVALID_REQUEST)
    assert r.register(1, reg(Role.AGENT, "web"))[0] == RegistrationAck("web")  # idempotent
    r.add_peer(3, AllowAll(), "anon")
    for s in ("a", "b", "c"):
        assert r.register(3, reg(Role.AGENT, s))[0] == RegistrationAck(s)
    assert r.register(3, reg(Role.AGENT, "d"))[0] == RegistrationNack("d", NackStatus.LIMIT_EXCEEDED)
    assert r.rejections == 4


def test_connectors_join_pools_and_agents_learn_up_and_down() -> None:
    r = setup()
    r.register(1, reg(Role.AGENT, "web"))
    reply, notes = r.register(10, reg(Role.CONNECTOR, "web"))
    assert reply == RegistrationAck("web") and notes == [Notify(1, ServiceStatus("web", True, healthy=True))]
    reply, notes = r.register(11, reg(Role.CONNECTOR, "web"))
    assert reply == RegistrationAck("web") and notes == []  # joins, takes nothing away
    assert r.connectors["web"] == [10, 11]
    assert r.remove_peer(10) == [] and r.connectors["web"] == [11]
    assert r.remove_peer(11) == [Notify(1, ServiceStatus("web", False))]
    assert "web" not in r.connectors


def test_unscoped_connector_cannot_join_scoped_pool() -> None:
    r = setup()
    r.register(10, reg(Role.CONNECTOR, "web"))
    r.add_peer(20, AllowAll(), "rogue")
    assert r.register(20, reg(Role.CONNECTOR, "web"))[0] == RegistrationNack("web", NackStatus.SERVICE_CONFLICT)
    # ... but may serve a service nobody scoped holds.
    assert r.register(20, reg(Role.CONNECTOR, "other"))[0] == RegistrationAck("other")


def test_routing_and_reply_rules() -> None:
    r = setup()
    r.register(1, reg(Role.AGENT, "web"))
    r.register(2, reg(Role.AGENT, "web"))
    r.register(1, reg(Role.AGENT, "db"))
    assert r.connector_for("web", flow_key(udp(1000))) is None
    r.register(10, reg(Role.CONNECTOR, "web"))
    r.register(11, reg(Role.CONNECTOR, "web"))
    picks = {r.connector_for("web", flow_key(udp(p))) for p in range(1000, 1200)}
    assert picks == {10, 11}  # flows spread over the pool
    # Stable: a flow keeps its connector while the pool is unchanged.
    assert all(r.connector_for("web", flow_key(udp(p))) == r.connector_for("web", flow_key(udp(p)))
               for p in range(1000, 1050))
    # Removing a connector moves only its own flows.
    before = {p: r.connector_for("web", flow_key(udp(p))) for p in range(1000, 1200)}
    r.remove_peer(11)
    after = {p: r.connector_for("web", flow_key(udp(p))) for p in range(1000, 1200)}
    assert all(after[p] == 10 for p in after) and all(before[p] == after[p] for p in before if before[p] == 10)
    assert r.is_agent_of(1, "db") and not r.is_agent_of(2, "db")
    assert r.may_reply(10, 1) and r.may_reply(10, 2)
    r.add_peer(12, Scoped(connector=["db"]), "c12")
    r.register(12, reg(Role.CONNECTOR, "db"))
    assert r.may_reply(12, 1) and not r.may_reply(12, 2)  # agent 2 does not use db
    assert not r.may_reply(12, 99)


def test_agent_leaving_notifies_each_connector_once() -> None:
    r = setup()
    r.register(10, reg(Role.CONNECTOR, "web"))
    r.register(10, reg(Role.CONNECTOR, "db"))
    r.register(1, reg(Role.AGENT, "web"))
    r.register(1, reg(Role.AGENT, "db"))
    assert r.remove_peer(1) == [Notify(10, AgentGone(agent=1))]
    assert r.remove_peer(1) == []
    assert r.services() == {"db": {"connectors": [10], "agents": []}, "web": {"connectors": [10], "agents": []}}


def test_flow_key_shapes() -> None:
    assert flow_key(b"") == b""
    k = flow_key(udp(1000))
    assert len(k) == 1 + 8 + 4 and k[0] == 17
    assert flow_key(udp(1000)) != flow_key(udp(1001))
    assert flow_key(b"\x45\x00") == b"\x45\x00"  # short packet hashes as a whole


# ---------------------------------------------------------------------- health and failover
def health_setup() -> Registry:
    r = setup()
    r.register(1, reg(Role.AGENT, "web"))
    r.register(10, reg(Role.CONNECTOR, "web"))
    r.register(11, reg(Role.CONNECTOR, "web"))
    return r


def test_unhealthy_connector_gets_no_new_flows_while_another_is_healthy() -> None:
    r = health_setup()
    assert {r.connector_for("web", udp(p)) for p in range(1000, 1100)} == {10, 11}
    # Still healthy as a pool: the Agent hears only who serves new flows now.
    assert r.set_health(11, "web", False, now=5.0) == [
        Notify(1, ServiceStatus("web", True, connector="c10", healthy=True))]
    assert r.peers[11].health == {"web": False} and r.last_failed[(11, "web")] == 5.0
    assert {r.connector_for("web", udp(p)) for p in range(1000, 1100)} == {10}
    assert r.pick("web", b"stream") == 10
    assert r.set_health(11, "web", False, now=6.0) == []            # no transition
    assert r.last_failed[(11, "web")] == 5.0
    assert r.health_transitions == {True: 0, False: 1}
    r.set_health(11, "web", True, now=9.0)
    assert {r.connector_for("web", udp(p)) for p in range(1000, 1100)} == {10, 11}
    assert r.health_transitions == {True: 1, False: 1}


def test_none_healthy_goes_to_least_recently_failed_and_agents_are_told() -> None:
    r = health_setup()
    r.set_health(10, "web", False, now=1.0)
    notes = r.set_health(11, "web", False, now=2.0)
    assert notes == [Notify(1, ServiceStatus("web", True, healthy=False))]
    assert notes[0].message.connector == "c10"        # failed longest ago
    assert r.candidates("web") == [10]
    assert {r.connector_for("web", udp(p)) for p in range(1000, 1100)} == {10}
    # 10 fails again later than 11: now 11 is the least-recently-failed one.
    r.set_health(10, "web", True, now=3.0)
    notes = r.set_health(10, "web", False, now=4.0)
    assert r.candidates("web") == [11] and notes[0].message.connector == "c11"
    # One comes back: the pool is healthy again and the Agent hears so.
    notes = r.set_health(10, "web", True, now=5.0)
    assert notes == [Notify(1, ServiceStatus("web", True, healthy=True))]
    # A newly registering Agent is told the pool's health at once.
    r.set_health(10, "web", False, now=6.0)
    _, notes = r.register(2, reg(Role.AGENT, "web"))
    assert notes == [Notify(2, ServiceStatus("web", True, healthy=False))]


def test_existing_datagram_flows_stay_on_their_connector() -> None:
    r = health_setup()
    flows = {p: r.connector_for("web", udp(p), now=0.0) for p in range(1000, 1100)}
    on_11 = [p for p, c in flows.items() if c == 11]
    assert on_11 and len(on_11) < 100
    r.set_health(11, "web", False, now=1.0)
    # Live flows keep their Connector; a new flow goes to the healthy one.
    assert all(r.connector_for("web", udp(p), now=2.0) == 11 for p in on_11)
    assert all(r.connector_for("web", udp(p), now=2.0) == 10 for p in range(2000, 2050))
    # Back to healthy: the flows moved to 10 meanwhile stay on 10.
    r.set_health(11, "web", True, now=3.0)
    assert all(r.connector_for("web", udp(p), now=4.0) == 10 for p in range(2000, 2050))
    # An idle pin expires: the same 5-tuple much later is a new flow.
    r.set_health(11, "web", False, now=5.0)
    assert all(r.connector_for("web", udp(p), now=200.0) == 10 for p in on_11)
    r.expire_pins(1000.0)
    assert not r.pins
    # A Connector leaving releases its pins.
    r.set_health(11, "web", True, now=1001.0)
    flows = {p: r.connector_for("web", udp(p), now=1001.0) for p in range(1000, 1100)}
    r.remove_peer(11)
    assert {r.connector_for("web", udp(p), now=1002.0) for p in flows} == {10}


def test_health_reports_for_services_not_served_are_ignored() -> None:
    r = health_setup()
    assert r.set_health(11, "db", False, now=1.0) == [] and r.health_ignored == 1
    assert r.set_health(99, "web", False, now=1.0) == [] and r.health_ignored == 2
    assert r.pick("web", b"k", healthy_only=False) in (10, 11)
    # A Connector leaving an unhealthy pool where the other is healthy flips nothing; the
    # healthy one leaving makes the pool unhealthy and the Agent hears it.
    r.set_health(11, "web", False, now=2.0)
    assert r.remove_peer(10) == [Notify(1, ServiceStatus("web", True, healthy=False))]
    assert (10, "web") not in r.last_failed
