"""The Agent's per-service runtime state, shared by the session and the data paths.

``ServiceState`` is one service's registration with the Intermediate and its counters;
the session (``ztna.agent.session``) owns the objects, the data paths (direct P2P,
userspace, TUN) read and count on them. Kept apart from the session so that the paths
need not import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ztna.agent.config import ServiceSpec

__all__ = ["ACKED", "PENDING", "REFUSED", "Registration", "ServiceState"]


class Registration(StrEnum):
    """Where a service's registration stands (the status JSON shows the value)."""

    PENDING = "pending"   # not sent yet, or sent and not answered
    ACKED = "acked"       # the Intermediate accepted it: packets may flow
    REFUSED = "refused"   # a permanent NACK: not retried until the session reconnects


PENDING, ACKED, REFUSED = Registration.PENDING, Registration.ACKED, Registration.REFUSED


@dataclass
class ServiceState:
    """Runtime state of one service (registration, counters)."""

    spec: ServiceSpec
    index: int
    prefix: bytes                     # 0x2F header: prefix + packet is the DATAGRAM
    registration: Registration = PENDING
    nack: str | None = None
    connector_up: bool | None = None  # from ServiceStatus; None = not told
    connector: str | None = None      # who serves it through the relay (ServiceStatus), if told
    path: str = "relay"
    attempts: int = 0
    next_retry: float = 0.0
    retry_delay: float = 1.0
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    # TCP carried on QUIC streams: payload bytes (also included in tx_bytes / rx_bytes,
    # which count IP packets in DATAGRAMs plus these) and streams opened.
    stream_tx_bytes: int = 0
    stream_rx_bytes: int = 0
    streams: int = 0
    queued_dropped: int = 0

    @property
    def ready(self) -> bool:
        return self.registration == ACKED
