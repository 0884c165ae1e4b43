"""What the admin API reads and may change, as plain data: no I/O, no reference to the server.

The Intermediate builds a `Snapshot` on request (`AdminSource.admin_snapshot`): a copy of its
registry, connections and recent flows taken in one go on the event loop, so the HTTP side
never holds on to live objects and nothing it does can change the data plane except the two
write operations of the Protocol. `LatencyHistogram` is the fixed-bucket histogram both the
handshake and the warm-up timings are kept in (cheap to update on the hot path: one bisect).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Final, Protocol

# Upper bounds in milliseconds (the last bucket is everything above).
BUCKETS_MS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)


@dataclass(slots=True)
class LatencyHistogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_MS) + 1))
    total: int = 0
    sum_ms: float = 0.0

    def observe(self, seconds: float) -> None:
        ms = max(0.0, seconds * 1000.0)
        self.counts[bisect.bisect_left(BUCKETS_MS, ms)] += 1
        self.total += 1
        self.sum_ms += ms

    def frozen(self) -> HistogramView:
        return HistogramView(tuple(self.counts), self.total, self.sum_ms)


@dataclass(frozen=True, slots=True)
class HistogramView:
    counts: tuple[int, ...]     # per bucket of BUCKETS_MS, then the overflow bucket
    total: int
    sum_ms: float

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding quantile `q` (None without samples or in the
        overflow bucket)."""
        if not self.total:
            return None
        rank, seen = q * self.total, 0
        for bound, count in zip(BUCKETS_MS, self.counts, strict=False):
            seen += count
            if seen >= rank:
                return bound
        return None


@dataclass(frozen=True, slots=True)
class ConnectionView:
    peer_id: int
    identity: str                       # the certificate's common name ("anonymous" without one)
    sans: tuple[str, ...]               # DNS:/IP: subject alternative names
    agent_services: tuple[str, ...]
    connector_services: tuple[str, ...]
    address: str                        # the peer's address as this server sees it
    rtt_ms: float | None
    bytes_sent: int                     # UDP payload bytes to the peer
    bytes_received: int
    connected_at: float                 # unix time
    health: dict[str, bool]             # Connectors: service -> healthy (missing = healthy)
    draining: bool                      # Connectors: drained by an administrator
    paths: dict[str, str]               # Agents: service -> "direct" / "relay" (last punch result)
    warmup_ms: dict[str, float]         # Agents: service -> punch request to direct, when it went direct

    @property
    def role(self) -> str:
        roles = [r for r, s in (("agent", self.agent_services), ("connector", self.connector_services)) if s]
        return "+".join(roles) or "none"


@dataclass(frozen=True, slots=True)
class FlowView:
    agent_id: int
    connector_id: int | None
    service: str
    destination: str                    # "ip:port" the Agent asked for
    bytes_up: int                       # Agent -> Connector
    bytes_down: int
    started_at: float                   # unix time
    ended_at: float | None              # None while open


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float                                 # unix time
    pools: dict[str, tuple[int, ...]]               # service -> Connector peer ids (join order)
    agents: dict[str, tuple[int, ...]]              # service -> Agent peer ids
    connections: dict[int, ConnectionView]
    flows: tuple[FlowView, ...]                     # open ones first, then the recent closed
    handshake: HistogramView
    warmup: HistogramView
    relayed_bytes: int


class AdminSource(Protocol):
    """What the Intermediate offers its admin API."""

    def admin_snapshot(self) -> Snapshot: ...

    def drain_connector(self, peer_id: int, drain: bool) -> bool:
        """Stop (or resume) giving new flows to that Connector; False if it is no Connector."""
        ...

    def disconnect_identity(self, identity: str) -> int:
        """Close every connection of that identity (common name); how many were closed."""
        ...
