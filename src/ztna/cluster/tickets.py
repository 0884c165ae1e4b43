"""Session tickets in the cluster store: the backend the native TLS code calls.

`put` keeps a new ticket's resumption state in the store with the ticket lifetime as its TTL;
`take` fetches and deletes it in one atomic `GETDEL`, so a ticket is single use across every
member (the strike register) and any member can resume a client in 0-RTT.

When the store does not answer, nothing is risked: `take` answers "unknown" (the client falls
back to a full handshake, and the replay of a captured early flight has no effect anywhere) and
`put` answers False (rustls then sends no ticket, so no client holds one that no member could
honour). While the store is known to be down (`StoreHealth.up` is False) neither call touches
it at all: the handshake goes on at once, and the member's probe brings tickets back when the
store answers again. Each refusal is counted (`refused_store_down`, `not_issued_store_down`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ztna.cluster.health import StoreHealth
from ztna.cluster.store import ClusterStore, StoreUnavailable
from ztna.quic.tickets import TicketStats

log = logging.getLogger("ztna.cluster")


@dataclass
class ClusterTicketStats(TicketStats):
    """`TicketStats` (same metrics) plus the store's own refusals."""

    refused_store_down: int = 0
    not_issued_store_down: int = 0


class ClusterTicketStore:
    def __init__(self, store: ClusterStore, health: StoreHealth, *, max_age: float = 7200.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_outage: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.health = health
        self.max_age = max_age
        self.clock = clock
        self.on_outage = on_outage
        self.stats = ClusterTicketStats()

    def _failed(self, error: str) -> None:
        if self.health.failed(self.clock(), error) and self.on_outage is not None:
            self.on_outage(error)

    # -- called by rustls (through the native endpoint) -------------------------------------
    def put(self, label: bytes, value: bytes) -> bool:
        if not self.health.up:
            self.stats.not_issued_store_down += 1
            return False
        try:
            self.store.put_ticket(label, value, self.max_age)
        except StoreUnavailable as exc:
            self._failed(str(exc))
            self.stats.not_issued_store_down += 1
            return False
        self.stats.issued += 1
        return True

    def take(self, label: bytes) -> bytes | None:
        if not self.health.up:
            self.stats.refused_store_down += 1
            return None
        try:
            value = self.store.take_ticket(label)
        except StoreUnavailable as exc:
            # Whether the GETDEL ran is unknown: the ticket counts as spent either way.
            self._failed(str(exc))
            self.stats.refused_store_down += 1
            return None
        if value is None:
            self.stats.refused_unknown += 1
            return None
        self.stats.resumed += 1
        return value

    def close(self) -> None:
        """Nothing of its own to close (the member closes the store)."""
