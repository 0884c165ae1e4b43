"""The Intermediate's registry: who serves and who uses which service, and where each
tunnel packet goes. Pure: no I/O, time passed in, randomness injected.

Theory of operation
-------------------
* Every QUIC connection is a *peer* with a numeric id (u32, never reused in a process
  lifetime) and an authorization (`allows(role, service)`, from its certificate's SANs).
* An Agent peer may register many services. A service may have **several Connectors**;
  new flows are spread over them by rendezvous hashing of the flow key, so a Connector
  leaving moves only the flows it carried (the others' flows keep their Connector).
* A registration never silently takes a service away: Connectors join the
  service's pool; a certificate without ztna SANs (only possible with the explicit
  insecure flag) may not join a pool held by scoped identities.
* Replies from a Connector carry the Agent id (0x31), so they go back to exactly that
  Agent; a Connector may only reply to Agents registered for a service it
  serves.
* Limits: registrations per peer; overflow is a NACK, never an exception.
* Health: each Connector reports, per service, whether its backend is healthy
  (`set_health`; a service it never reported counts as healthy). New flows go only to
  healthy Connectors while one exists; when none is, to the least-recently-failed one
  (the Connector whose last failure is oldest), and the Agents are told
  (`ServiceStatus.healthy=False`). Existing flows stay where they are: relayed datagram
  flows are pinned to the Connector that got their first packet (until idle for
  `FLOW_PIN_IDLE` seconds), streams belong to their splice, resumptions ignore health.

Methods return the reply message plus a list of `Notify` actions for other peers; the
driver executes them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from ztna import limits
from ztna.wire.control import ControlMessage
from ztna.wire.control_messages import AgentGone, ServiceStatus
from ztna.wire.registration import (
    NackStatus,
    Register,
    RegistrationAck,
    RegistrationNack,
    Role,
)


class Authorization(Protocol):
    @property
    def scoped(self) -> bool: ...

    def allows(self, role: str, service: str) -> bool: ...


class AllowAll:
    """Authorization of a peer when client certificates are not checked at all (insecure)."""

    scoped = False

    def allows(self, role: str, service: str) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Notify:
    """Send this control message to that peer."""

    peer: int
    message: ControlMessage


@dataclass(slots=True)
class Peer:
    peer_id: int
    auth: Authorization
    label: str
    agent_services: set[str] = field(default_factory=set)
    connector_services: set[str] = field(default_factory=set)
    # service -> healthy, as the Connector last reported it; a service missing here counts
    # as healthy (a Connector that does not check, or has not reported yet).
    health: dict[str, bool] = field(default_factory=dict)


# A relayed datagram flow (UDP, ICMP, TCP in IP packets) keeps its Connector while packets
# keep coming: a health change or a Connector joining must not move a live flow (the new
# Connector has no state for it). An idle pin expires, so a 5-tuple reused much later is a
# new flow and gets a healthy Connector. Bounded: the oldest pins go first.
FLOW_PIN_IDLE = 120.0
MAX_FLOW_PINS = 65536


class Registry:
    def __init__(self, *, max_registrations: int = limits.MAX_REGISTRATIONS_PER_CONNECTION) -> None:
        self.max_registrations = max_registrations
        self.peers: dict[int, Peer] = {}
        self.connectors: dict[str, list[int]] = {}   # service -> connector peer ids (join order)
        self.agents: dict[str, set[int]] = {}        # service -> agent peer ids
        self.rejections = 0
        self.registrations = 0
        # (connector peer id, service) -> when it last went unhealthy (the `now` of set_health).
        self.last_failed: dict[tuple[int, str], float] = {}
        # (service, flow key) -> [connector peer id, last packet time]; see FLOW_PIN_IDLE.
        self.pins: OrderedDict[tuple[str, bytes], list[float]] = OrderedDict()
        # Health reports that changed a Connector's state, by new state (metrics).
        self.health_transitions: dict[bool, int] = {True: 0, False: 0}
        self.health_ignored = 0   # reports for a service the peer does not serve
        # Connectors an administrator drained: no new flows while another Connector of the
        # same service is not drained (drain beats health); existing flows stay.
        self.draining: set[int] = set()
        # What changed since the driver last looked (it re-derives its native relay routes
        # from this: `take_changed`): (service, agent id) when one Agent came or went,
        # (service, None) when the service's Connector pool changed (every Agent of it).
        self.changed: set[tuple[str, int | None]] = set()

    # ------------------------------------------------------------------ peers
    def add_peer(self, peer_id: int, auth: Authorization, label: str = "") -> Peer:
        peer = Peer(peer_id, auth, label or str(peer_id))
        self.peers[peer_id] = peer
        return peer

    def remove_peer(self, peer_id: int) -> list[Notify]:
        """A connection ended: drop its registrations and tell whoever is affected."""
        peer = self.peers.pop(peer_id, None)
        self.draining.discard(peer_id)
        if peer is None:
            return []
        notes: list[Notify] = []
        self.changed.update((service, peer_id) for service in peer.agent_services)
        self.changed.update((service, None) for service in peer.connector_services)
        for service in peer.agent_services:
            users = self.agents.get(service)
            if users is not None:
                users.discard(peer_id)
                if not users:
                    del self.agents[service]
            for connector in self.connectors.get(service, ()):
                notes.append(Notify(connector, AgentGone(agent=peer_id)))
        for service in peer.connector_services:
            self.last_failed.pop((peer_id, service), None)
            pool = self.connectors.get(service)
            if pool is None:
                continue
            # The peer is already out of `peers`: its own health comes from the object.
            was_healthy = peer.health.get(service, True) or self.pool_healthy(service)
            if peer_id in pool:
                pool.remove(peer_id)
            if not pool:
                del self.connectors[service]
                for agent in sorted(self.agents.get(service, ())):
                    notes.append(Notify(agent, ServiceStatus(service=service, up=False)))
            elif self.pool_healthy(service) != was_healthy:
                notes.extend(self._status_to_agents(service))
        # One AgentGone per Connector is enough even if it served several of the services.
        seen: set[tuple[int, object]] = set()
        unique = []
        for note in notes:
            key = (note.peer, note.message)
            if key not in seen:
                seen.add(key)
                unique.append(note)
        return unique

    # ------------------------------------------------------------------ registration
    def register(self, peer_id: int, msg: Register) -> tuple[RegistrationAck | RegistrationNack, list[Notify]]:
        peer = self.peers.get(peer_id)
        service = msg.service_id
        if peer is None:
            return self._nack(service, NackStatus.INVALID_REQUEST), []
        role = msg.role.value
        if not peer.auth.allows(role, service):
            return self._nack(service, NackStatus.NOT_AUTHORIZED), []
        own = peer.agent_services if msg.role is Role.AGENT else peer.connector_services
        if service in own:
            self.registrations += 1
            return RegistrationAck(service_id=service), []  # idempotent re-registration
        if len(peer.agent_services) + len(peer.connector_services) >= self.max_registrations:
            return self._nack(service, NackStatus.LIMIT_EXCEEDED), []
        notes: list[Notify] = []
        if msg.role is Role.AGENT:
            peer.agent_services.add(service)
            self.agents.setdefault(service, set()).add(peer_id)
            if service not in self.connectors:
                notes.append(Notify(peer_id, ServiceStatus(service=service, up=False)))
            else:
                # Without this an Agent arriving after its Connector never learns that the
                # service is up (only transitions were announced).
                notes.append(Notify(peer_id, self._status(service)))
        else:
            pool = self.connectors.get(service, [])
            if pool and not peer.auth.scoped:
                if any(self.peers[c].auth.scoped for c in pool):
                    return self._nack(service, NackStatus.SERVICE_CONFLICT), []
            was_down = not pool
            was_healthy = self.pool_healthy(service)
            pool.append(peer_id)
            self.connectors[service] = pool
            peer.connector_services.add(service)
            if was_down or self.pool_healthy(service) != was_healthy:
                notes.extend(self._status_to_agents(service))
        self.registrations += 1
        self.changed.add((service, peer_id if msg.role is Role.AGENT else None))
        return RegistrationAck(service_id=service), notes

    # ------------------------------------------------------------------ health
    def set_health(self, peer_id: int, service: str, healthy: bool, now: float) -> list[Notify]:
        """A Connector reports its backend's health for `service`. Returns the
        ServiceStatus updates for the service's Agents when the pool as a whole changed
        between "some Connector healthy" and "none healthy"."""
        peer = self.peers.get(peer_id)
        if peer is None or service not in peer.connector_services:
            self.health_ignored += 1
            return []
        before = peer.health.get(service, True)
        old_status = self._status(service)
        peer.health[service] = healthy
        if before == healthy:
            return []
        if not healthy:
            self.last_failed[(peer_id, service)] = now
        self.health_transitions[healthy] += 1
        status = self._status(service)
        if (status.healthy, status.connector) == (old_status.healthy, old_status.connector):
            return []
        return [Notify(agent, status) for agent in sorted(self.agents.get(service, ()))]

    def is_healthy(self, peer_id: int, service: str) -> bool:
        peer = self.peers.get(peer_id)
        return peer is not None and peer.health.get(service, True)

    def pool_healthy(self, service: str) -> bool:
        """At least one Connector of `service` is healthy (False for an empty pool)."""
        return any(self.is_healthy(c, service) for c in self.connectors.get(service, ()))

    def candidates(self, service: str) -> list[int]:
        """The Connectors new flows of `service` may go to: the healthy ones, or, when none
        is, the least-recently-failed one (oldest last failure; ties: join order); all of
        them among the Connectors not drained, unless every one of the pool is."""
        pool = self.connectors.get(service, [])
        pool = [c for c in pool if c not in self.draining] or pool
        healthy = [c for c in pool if self.is_healthy(c, service)]
        if healthy or not pool:
            return healthy
        return [min(pool, key=lambda c: self.last_failed.get((c, service), float("-inf")))]

    def set_draining(self, peer_id: int, drain: bool) -> bool:
        """Drain (or undrain) a Connector; False when `peer_id` is no Connector."""
        peer = self.peers.get(peer_id)
        if peer is None or not peer.connector_services:
            return False
        if drain:
            self.draining.add(peer_id)
        else:
            self.draining.discard(peer_id)
        return True

    def _status(self, service: str) -> ServiceStatus:
        if not self.connectors.get(service):
            return ServiceStatus(service=service, up=False)
        healthy = self.pool_healthy(service)
        # The label names the Connectors new flows go to: the healthy ones, or the
        # least-recently-failed one.
        label = self._pool_label(service, self.candidates(service))
        return ServiceStatus(service=service, up=True, connector=label, healthy=healthy)

    def _status_to_agents(self, service: str) -> list[Notify]:
        status = self._status(service)
        return [Notify(agent, status) for agent in sorted(self.agents.get(service, ()))]

    def _pool_label(self, service: str, pool: list[int] | None = None) -> str:
        """Who serves `service` now, for the Agents' status: the Connectors' labels."""
        members = self.connectors.get(service, []) if pool is None else pool
        labels = [self.peers[c].label for c in members if c in self.peers]
        text = ", ".join(labels[:4]) + (f" (+{len(labels) - 4})" if len(labels) > 4 else "")
        return text[:256]

    def _nack(self, service: str, status: NackStatus) -> RegistrationNack:
        self.rejections += 1
        return RegistrationNack(service_id=service, status=status)

    def take_changed(self) -> set[tuple[str, int | None]]:
        changed, self.changed = self.changed, set()
        return changed

    # ------------------------------------------------------------------ routing
    def sole_connector(self, service: str) -> int | None:
        """The Connector of `service` when its pool has exactly one: every packet of the
        service goes there whatever its flow (what `connector_for` answers), so the relay
        may decide once instead of per packet."""
        pool = self.connectors.get(service)
        return pool[0] if pool is not None and len(pool) == 1 else None

    def is_agent_of(self, peer_id: int, service: str) -> bool:
        peer = self.peers.get(peer_id)
        return peer is not None and service in peer.agent_services

    def connector_for(self, service: str, packet: bytes | memoryview, *, now: float | None = None) -> int | None:
        """Pick the Connector for a relayed packet's flow: rendezvous hashing of the flow
        key over the Connectors new flows may go to (`candidates`). With `now` the choice
        is pinned for the flow (FLOW_PIN_IDLE), so later packets of it stay on that
        Connector whatever health says meanwhile. The flow key is only computed when the
        pool offers a choice."""
        pool = self.connectors.get(service)
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        key = flow_key(packet)
        if now is None:
            return self.pick(service, key)
        pins = self.pins
        pin_key = (service, key)
        pin = pins.get(pin_key)
        if pin is not None:
            connector = int(pin[0])
            if now - pin[1] <= FLOW_PIN_IDLE and connector in pool:
                pin[1] = now
                pins.move_to_end(pin_key)
                return connector
        chosen = self.pick(service, key)
        if chosen is not None:
            self.expire_pins(now)   # amortised: only the stale front goes
            pins[pin_key] = [chosen, now]
            pins.move_to_end(pin_key)
            while len(pins) > MAX_FLOW_PINS:
                pins.popitem(last=False)
        return chosen

    def pick(self, service: str, key: bytes, *, healthy_only: bool = True) -> int | None:
        """Rendezvous hashing of `key` over the service's Connectors: the candidates for a
        new flow, or (healthy_only=False) the whole pool, for what must find the Connector
        that already holds a flow (a stream resumption)."""
        pool = self.candidates(service) if healthy_only else self.connectors.get(service, [])
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        best, best_score = pool[0], b""
        for connector in pool:
            score = hashlib.blake2b(key + connector.to_bytes(4, "big"), digest_size=8).digest()
            if score > best_score:
                best, best_score = connector, score
        return best

    def expire_pins(self, now: float) -> None:
        """Drop pins idle for longer than FLOW_PIN_IDLE (oldest first; called now and then)."""
        pins = self.pins
        while pins:
            key, pin = next(iter(pins.items()))
            if now - pin[1] <= FLOW_PIN_IDLE:
                break
            del pins[key]

    def may_reply(self, connector_id: int, agent_id: int) -> bool:
        """A Connector may send to an Agent only if it serves a service the Agent uses."""
        connector = self.peers.get(connector_id)
        agent = self.peers.get(agent_id)
        if connector is None or agent is None:
            return False
        return not connector.connector_services.isdisjoint(agent.agent_services)

    def services(self) -> dict[str, dict[str, list[int]]]:
        names = set(self.connectors) | set(self.agents)
        return {
            s: {"connectors": list(self.connectors.get(s, [])), "agents": sorted(self.agents.get(s, set()))}
            for s in sorted(names)
        }


def flow_key(packet: bytes | memoryview) -> bytes:
    """Bytes naming an IP packet's flow: addresses, protocol and ports (direction-free
    callers always pass Agent→service packets). Short or odd packets hash as a whole."""
    if not packet:
        return b""
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 0x0F) * 4
        return bytes(packet[9:10]) + bytes(packet[12:20]) + bytes(packet[ihl : ihl + 4])
    if version == 6 and len(packet) >= 40:
        return bytes(packet[6:7]) + bytes(packet[8:40]) + bytes(packet[40:44])
    return bytes(packet[:64])
