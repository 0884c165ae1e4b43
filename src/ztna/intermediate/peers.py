"""Who is who among the Intermediate's connections: peer ids, stable-id adoption, and what a
peer sent before it could be served.

* `PeerIds` hands out sequential peer ids (in use by no connection and no registry entry)
  and decides when a connection takes the stable id its certificate and `Hello.instance`
  give it (docs/protocol.md "Peer ids"), so a Connector's flows survive an Agent's reconnect.
* What arrives too early is kept in `ztna.early.EarlyHold`s: 0-RTT data before the peer's
  identity is known (`EarlyFlight`: both kinds of a peer's early data, control messages
  given back first, so a Hello and a Register take effect before the packets that need
  them), and tunnel packets that overtook the registration they depend on
  (`registration_hold`).

Pure: times are passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass

from ztna.early import EarlyHold
from ztna.identity import stable_peer_id
from ztna.intermediate.registry import Registry
from ztna.wire import ControlMessage

MAX_PEER_ID = 0xFFFFFFFF


class EarlyFlight:
    """A peer's early data before its identity is known (0-RTT from a peer whose ticket did
    not carry it yet): control messages and DATAGRAMs, each bounded, replayed control first."""

    # A Hello and a Register per service fit many times.
    MESSAGES = 64
    DATAGRAM_BYTES = 65536

    __slots__ = ("messages", "datagrams")

    def __init__(self) -> None:
        self.messages: EarlyHold[ControlMessage] = EarlyHold(self.MESSAGES)
        self.datagrams: EarlyHold[bytes] = EarlyHold(max_bytes=self.DATAGRAM_BYTES)

    def hold_message(self, msg: ControlMessage) -> bool:
        return self.messages.hold(msg)

    def hold_datagram(self, data: bytes) -> bool:
        return self.datagrams.hold(data, size=len(data))

    def take(self) -> tuple[list[ControlMessage], list[bytes]]:
        """What to replay once the peer can be served, in this order."""
        return self.messages.take(), self.datagrams.take()


# An Agent resuming with 0-RTT sends Hello, Register and its first tunnel packets in one
# flight; DATAGRAM frames may be packed before the STREAM frames, so those packets can
# arrive just before the registration they depend on. A few are held (bounded, only in the
# first seconds of a connection) instead of dropped.
EARLY_HOLD_PACKETS = 32
EARLY_HOLD_SECONDS = 2.0


def registration_hold(created_at: float) -> EarlyHold[bytes]:
    """The hold for tunnel packets of a connection created at `created_at`."""
    return EarlyHold(EARLY_HOLD_PACKETS, until=created_at + EARLY_HOLD_SECONDS)


@dataclass(frozen=True, slots=True)
class Adopt:
    """Re-key the connection to `new_id`. `supersede`: a stale connection of the same client
    (same certificate, same Hello instance) holds that id and goes first."""

    new_id: int
    key: tuple[str, int]
    supersede: bool


class PeerIds:
    """Sequential peer ids, and the stable ids connections adopted (with the (certificate
    fingerprint, Hello instance) that justified each)."""

    __slots__ = ("_next", "instances")

    def __init__(self) -> None:
        self._next = 1
        self.instances: dict[int, tuple[str, int]] = {}

    def next_id(self, in_use: Callable[[int], bool]) -> int:
        """A peer id for which `in_use` is False (stable ids live in the same space)."""
        peer_id = self._next
        while in_use(peer_id):
            peer_id = (peer_id % MAX_PEER_ID) + 1
        self._next = (peer_id % MAX_PEER_ID) + 1
        return peer_id

    def adoption(self, registry: Registry, connected: Container[int], old_id: int,
                 fingerprint: str, instance: int) -> Adopt | None:
        """Whether the connection now known as `old_id` takes its stable id on `Hello`
        (`connected`: the ids of live connections). Only before its first registration, and
        never an id someone else holds: another client's, or a remote Agent's (the mesh)."""
        peer = registry.peers.get(old_id)
        if peer is None or peer.agent_services or peer.connector_services:
            return None
        key = (fingerprint, instance)
        new_id = stable_peer_id(fingerprint, instance)
        if new_id == old_id:
            return None
        if new_id in registry.peers and new_id not in connected:
            return None
        if new_id in connected:
            if self.instances.get(new_id) != key:
                return None
            return Adopt(new_id, key, supersede=True)
        return Adopt(new_id, key, supersede=False)

    def adopted(self, adopt: Adopt) -> None:
        self.instances[adopt.new_id] = adopt.key

    def forget(self, peer_id: int) -> None:
        self.instances.pop(peer_id, None)
