"""The Agent's per-service runtime state, shared by the session and the data paths, and
the registration state machine that runs on it.

``ServiceState`` is one service's registration with the Intermediate and its counters;
the session (``ztna.agent.session``) owns the objects, the data paths (direct P2P,
userspace, TUN) read and count on them. Kept apart from the session so that the paths
need not import it.

Registration (pure: time is an argument; the session sends, logs and times):

    PENDING --Register sent--> PENDING (attempt n; next retry after 1, 2, 4 ... s, capped)
    PENDING --ACK--> ACKED                  PENDING/ACKED --NACK transient--> PENDING
    PENDING --NACK final--> REFUSED         ACKED --connection lost--> PENDING
    any --new connection--> PENDING (attempts reset: the policy may have changed meanwhile)

``due_registrations`` says which Registers to send now, ``apply_ack`` / ``apply_nack``
take the answers, ``reset_registration`` / ``connection_lost`` the connection's life.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from ztna.agent.config import ServiceSpec
from ztna.wire import NackStatus

__all__ = ["ACKED", "PENDING", "REFUSED", "TRANSIENT_NACKS", "Registration", "ServiceState",
           "apply_ack", "apply_nack", "connection_lost", "due_registrations",
           "reset_registration"]


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
    def ready(self) -> bool:
        return self.registration == ACKED


# NACKs that mean "not now" (the Intermediate is shutting down or full): retried; any other
# status is final for this connection.
TRANSIENT_NACKS = (NackStatus.SHUTTING_DOWN, NackStatus.LIMIT_EXCEEDED)


def reset_registration(svc: ServiceState, *, first_retry: float) -> None:
    """A new connection: register again from scratch (refused services too)."""
    svc.registration, svc.nack, svc.attempts, svc.next_retry = PENDING, None, 0, 0.0
    svc.connector_up = None
    svc.connector = None
    svc.healthy = None
    svc.retry_delay = first_retry


def connection_lost(services: Iterable[ServiceState]) -> None:
    """The connection died: what was acknowledged must be registered again."""
    for svc in services:
        if svc.registration == ACKED:
            svc.registration = PENDING


def due_registrations(services: Iterable[ServiceState], *, now: float,
                      backoff_cap: float) -> list[tuple[ServiceState, bool]]:
    """The services whose Register is due at `now`, each with True when it is a re-send of
    an unanswered one. Each is charged an attempt; its retry delay doubles up to the cap."""
    due = []
    for svc in services:
        if svc.registration != PENDING or now < svc.next_retry:
            continue
        due.append((svc, bool(svc.attempts and svc.next_retry)))
        svc.attempts += 1
        svc.next_retry = now + svc.retry_delay
        svc.retry_delay = min(svc.retry_delay * 2, backoff_cap)
    return due


def apply_ack(svc: ServiceState, *, first_retry: float) -> bool:
    """An ACK; False when the service was already acknowledged (nothing changes)."""
    if svc.registration == ACKED:
        return False
    svc.registration, svc.nack, svc.attempts, svc.next_retry = ACKED, None, 0, 0.0
    svc.retry_delay = first_retry
    return True


def apply_nack(svc: ServiceState, status: NackStatus, *, now: float) -> Registration:
    """A NACK: transient ones retry after the current delay, others refuse the service."""
    svc.nack = status.name
    if status in TRANSIENT_NACKS:
        svc.registration = PENDING
        svc.next_retry = now + svc.retry_delay
    else:
        svc.registration = REFUSED
    return svc.registration
