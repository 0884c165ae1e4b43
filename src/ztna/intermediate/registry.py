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

Methods return the reply message plus a list of `Notify` actions for other peers; the
driver executes them.
"""

from __future__ import annotations

import hashlib
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


class Registry:
    def __init__(self, *, max_registrations: int = limits.MAX_REGISTRATIONS_PER_CONNECTION) -> None:
        self.max_registrations = max_registrations
        self.peers: dict[int, Peer] = {}
        self.connectors: dict[str, list[int]] = {}   # service -> connector peer ids (join order)
        self.agents: dict[str, set[int]] = {}        # service -> agent peer ids
        self.rejections = 0
        self.registrations = 0
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
            pool = self.connectors.get(service)
            if pool is None:
                continue
            if peer_id in pool:
                pool.remove(peer_id)
            if not pool:
                del self.connectors[service]
                for agent in sorted(self.agents.get(service, ())):
                    notes.append(Notify(agent, ServiceStatus(service=service, up=False)))
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
                notes.append(Notify(peer_id, ServiceStatus(service=service, up=True,
                                                           connector=self._pool_label(service))))
        else:
            pool = self.connectors.get(service, [])
            if pool and not peer.auth.scoped:
                if any(self.peers[c].auth.scoped for c in pool):
                    return self._nack(service, NackStatus.SERVICE_CONFLICT), []
            was_down = not pool
            pool.append(peer_id)
            self.connectors[service] = pool
            peer.connector_services.add(service)
            if was_down:
                label = self._pool_label(service)
                for agent in sorted(self.agents.get(service, ())):
                    notes.append(Notify(agent, ServiceStatus(service=service, up=True, connector=label)))
        self.registrations += 1
        self.changed.add((service, peer_id if msg.role is Role.AGENT else None))
        return RegistrationAck(service_id=service), notes

    def _pool_label(self, service: str) -> str:
        """Who serves `service` now, for the Agents' status: the Connectors' labels."""
        labels = [self.peers[c].label for c in self.connectors.get(service, ()) if c in self.peers]
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

    def connector_for(self, service: str, packet: bytes | memoryview) -> int | None:
        """Pick the Connector for a packet's flow: rendezvous hashing over the service's
        pool (the flow key is only computed when there is a choice to make)."""
        pool = self.connectors.get(service)
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        key = flow_key(packet)
        best, best_score = pool[0], b""
        for connector in pool:
            score = hashlib.blake2b(key + connector.to_bytes(4, "big"), digest_size=8).digest()
            if score > best_score:
                best, best_score = connector, score
        return best

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
