"""The one registration state machine of the links to the Intermediate (pure: time is an
argument; the programs send, log and time).

Both the Agent and the Connector register each of their services on the control stream
and track the answer per service. The rule is the same, parameterised per program by a
`RegistrationPolicy`:

    PENDING --Register sent--> PENDING (attempt n; next after first_retry, doubling to cap)
    PENDING --ACK--> ACKED                  PENDING/ACKED --NACK transient--> PENDING
    PENDING --NACK final--> REFUSED         ACKED --connection lost--> PENDING
    any --new connection--> PENDING (attempts reset: the policy may have changed meanwhile)

A transient NACK (SHUTTING_DOWN, LIMIT_EXCEEDED: "not now") is retried after
`nack_retry` seconds, or, when that is None, after the current resend delay. The Agent
resends unanswered Registers after 1, 2, 4 ... s up to its backoff cap; the Connector
every 2 s, and waits 30 s after a transient NACK.

A `Slot` is anything holding one service's registration fields (the Agent's per-service
runtime state is one; the Connector uses `ServiceRegistration`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar

from ztna.wire import NackStatus

__all__ = ["ACKED", "AGENT_NACK_RETRY", "CONNECTOR_POLICY", "PENDING", "REFUSED",
           "TRANSIENT_NACKS", "Registration", "RegistrationPolicy", "ServiceRegistration",
           "Slot", "apply_ack", "apply_nack", "connection_lost", "connector_label",
           "due_registrations", "reset_registration"]


class Registration(StrEnum):
    """Where a service's registration stands (the Agent's status JSON shows the value)."""

    PENDING = "pending"   # not sent yet, or sent and not answered
    ACKED = "acked"       # the Intermediate accepted it: packets may flow
    REFUSED = "refused"   # a permanent NACK: not retried until the link reconnects


PENDING, ACKED, REFUSED = Registration.PENDING, Registration.ACKED, Registration.REFUSED

# NACKs that mean "not now" (the Intermediate is shutting down or full): retried; any other
# status is final for this connection.
TRANSIENT_NACKS = frozenset({NackStatus.SHUTTING_DOWN, NackStatus.LIMIT_EXCEEDED})
AGENT_NACK_RETRY = None   # the Agent retries a transient NACK after its current resend delay


@dataclass(frozen=True, slots=True)
class RegistrationPolicy:
    """How one program paces its Registers."""

    first_retry: float               # resend an unanswered Register after this long ...
    cap: float                       # ... doubling up to this (== first_retry: a fixed pace)
    nack_retry: float | None = None  # after a transient NACK; None: the current resend delay


CONNECTOR_POLICY = RegistrationPolicy(first_retry=2.0, cap=2.0, nack_retry=30.0)


class Slot(Protocol):
    @property
    def service_id(self) -> str: ...

    registration: Registration
    nack: str | None
    attempts: int
    next_retry: float
    retry_delay: float


@dataclass
class ServiceRegistration:
    """One service's registration on a link (the Connector's; the Agent keeps the same
    fields on its per-service state)."""

    service_id: str
    registration: Registration = PENDING
    nack: str | None = None
    attempts: int = 0
    next_retry: float = 0.0
    retry_delay: float = 1.0


S = TypeVar("S", bound=Slot)


def connector_label(slot: Slot) -> str:
    """The Connector's words for a registration in its health JSON and metrics."""
    if slot.registration is ACKED:
        return "registered"
    if slot.registration is REFUSED:
        return f"refused: {slot.nack}"
    return f"nack: {slot.nack}" if slot.nack else "pending"


def reset_registration(slot: Slot, policy: RegistrationPolicy) -> None:
    """A new connection: register again from scratch (refused services too)."""
    slot.registration, slot.nack, slot.attempts, slot.next_retry = PENDING, None, 0, 0.0
    slot.retry_delay = policy.first_retry


def connection_lost(slots: Iterable[Slot]) -> None:
    """The connection died: what was acknowledged must be registered again."""
    for slot in slots:
        if slot.registration is ACKED:
            slot.registration = PENDING


def due_registrations(slots: Iterable[S], *, now: float,
                      policy: RegistrationPolicy) -> list[tuple[S, bool]]:
    """The slots whose Register is due at `now`, each with True when it is a re-send of
    an unanswered one. Each is charged an attempt; its resend delay doubles up to the cap."""
    due = []
    for slot in slots:
        if slot.registration is not PENDING or now < slot.next_retry:
            continue
        due.append((slot, bool(slot.attempts and slot.next_retry)))
        slot.attempts += 1
        slot.next_retry = now + slot.retry_delay
        slot.retry_delay = min(slot.retry_delay * 2, policy.cap)
    return due


def apply_ack(slot: Slot, policy: RegistrationPolicy) -> bool:
    """An ACK; False when the service was already acknowledged (nothing changes)."""
    if slot.registration is ACKED:
        return False
    slot.registration, slot.nack, slot.attempts, slot.next_retry = ACKED, None, 0, 0.0
    slot.retry_delay = policy.first_retry
    return True


def apply_nack(slot: Slot, status: NackStatus, *, now: float,
               policy: RegistrationPolicy) -> Registration:
    """A NACK: transient ones retry later, others refuse the service."""
    slot.nack = status.name
    if status in TRANSIENT_NACKS:
        slot.registration = PENDING
        slot.next_retry = now + (slot.retry_delay if policy.nack_retry is None else policy.nack_retry)
    else:
        slot.registration = REFUSED
    return slot.registration
