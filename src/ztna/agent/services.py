"""The Agent's per-service runtime state, shared by the session and the data paths, and
the registration state machine that runs on it.

``ServiceState`` is one service's registration with the Intermediate and its counters;
the session (``ztna.agent.session``) owns the objects, the data paths (direct P2P,
userspace, TUN) read and count on them. Kept apart from the session so that the paths
need not import it.

Registration runs on the one state machine of both programs' links
(``ztna.link.registration``); the helpers here give it the Agent's pacing (resends after
``register_retry`` seconds, doubling up to the backoff cap) and clear what the Agent
learned from the Intermediate about each service on a new connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ztna.agent.config import ServiceSpec
from ztna.link import registration as link_registration
from ztna.link.registration import (
    ACKED,
    AGENT_NACK_RETRY,
    PENDING,
    REFUSED,
    TRANSIENT_NACKS,
    Registration,
    RegistrationPolicy,
    connection_lost,
)
from ztna.wire import NackStatus

__all__ = ["ACKED", "PENDING", "REFUSED", "TRANSIENT_NACKS", "Registration", "ServiceState",
           "apply_ack", "apply_nack", "connection_lost", "due_registrations",
           "reset_registration"]


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
    # ServiceStatus.healthy: False when no Connector's backend is healthy (new flows go to
    # the least-recently-failed one); None = not told.
    healthy: bool | None = None
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
    def service_id(self) -> str:
        return self.spec.id

    @property
    def ready(self) -> bool:
        return self.registration == ACKED


def _policy(first_retry: float, cap: float | None = None) -> RegistrationPolicy:
    return RegistrationPolicy(first_retry=first_retry, cap=first_retry if cap is None else cap,
                              nack_retry=AGENT_NACK_RETRY)


def reset_registration(svc: ServiceState, *, first_retry: float) -> None:
    """A new connection: register again from scratch (refused services too), and forget
    what the last Intermediate said about the service's Connectors."""
    link_registration.reset_registration(svc, _policy(first_retry))
    svc.connector_up = None
    svc.connector = None
    svc.healthy = None


def due_registrations(services: Iterable[ServiceState], *, now: float,
                      backoff_cap: float) -> list[tuple[ServiceState, bool]]:
    """The services whose Register is due at `now`, each with True when it is a re-send of
    an unanswered one. Each is charged an attempt; its retry delay doubles up to the cap."""
    return link_registration.due_registrations(services, now=now, policy=_policy(0.0, backoff_cap))


def apply_ack(svc: ServiceState, *, first_retry: float) -> bool:
    """An ACK; False when the service was already acknowledged (nothing changes)."""
    return link_registration.apply_ack(svc, _policy(first_retry))


def apply_nack(svc: ServiceState, status: NackStatus, *, now: float) -> Registration:
    """A NACK: transient ones retry after the current delay, others refuse the service."""
    return link_registration.apply_nack(svc, status, now=now, policy=_policy(svc.retry_delay))
