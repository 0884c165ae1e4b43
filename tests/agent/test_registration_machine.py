"""The Agent's registration state machine (`ztna.agent.services`), in memory: which
Registers are due when, the backoff, and what ACKs, NACKs and reconnects do."""

from __future__ import annotations

from ztna.agent.config import ServiceSpec
from ztna.agent.services import (
    ACKED,
    PENDING,
    REFUSED,
    Registration,
    ServiceState,
    apply_ack,
    apply_nack,
    connection_lost,
    due_registrations,
    reset_registration,
)
from ztna.wire import NackStatus, service_datagram_prefix

FIRST, CAP = 1.0, 8.0


def _svc(sid: str = "web", index: int = 0) -> ServiceState:
    svc = ServiceState(spec=ServiceSpec(id=sid, virtual_ips=("10.100.0.2",)), index=index,
                       prefix=service_datagram_prefix(sid))
    reset_registration(svc, first_retry=FIRST)
    return svc


def _due(services: list[ServiceState], now: float) -> list[tuple[str, bool]]:
    return [(s.spec.id, resend) for s, resend in due_registrations(services, now=now, backoff_cap=CAP)]


def test_unanswered_registers_are_resent_with_a_capped_doubling_backoff() -> None:
    svc = _svc()
    assert _due([svc], 0.0) == [("web", False)]
    sent_at = [0.0]
    now = 0.0
    while now < 40.0:
        now = round(now + 0.25, 2)
        if _due([svc], now):
            sent_at.append(now)
    assert sent_at == [0.0, 1.0, 3.0, 7.0, 15.0, 23.0, 31.0, 39.0]   # +1, +2, +4, then +8
    assert svc.attempts == len(sent_at) and svc.registration is PENDING


def test_ack_stops_the_resends_and_a_second_ack_changes_nothing() -> None:
    svc = _svc()
    _due([svc], 0.0)
    _due([svc], 1.0)
    assert apply_ack(svc, first_retry=FIRST) is True
    assert (svc.registration, svc.attempts, svc.retry_delay, svc.ready) == (ACKED, 0, FIRST, True)
    assert apply_ack(svc, first_retry=FIRST) is False
    assert _due([svc], 100.0) == []


def test_a_transient_nack_retries_after_the_delay_and_a_final_one_refuses() -> None:
    svc = _svc()
    _due([svc], 0.0)                                    # next delay: 2 s
    assert apply_nack(svc, NackStatus.LIMIT_EXCEEDED, now=0.5) is Registration.PENDING
    assert svc.nack == "LIMIT_EXCEEDED" and svc.next_retry == 2.5
    assert _due([svc], 2.4) == []
    assert _due([svc], 2.5) == [("web", True)]
    assert apply_nack(svc, NackStatus.NOT_AUTHORIZED, now=3.0) is REFUSED
    assert _due([svc], 1000.0) == [] and not svc.ready


def test_reconnects_register_everything_again() -> None:
    web, db = _svc("web"), _svc("db", 1)
    _due([web, db], 0.0)
    apply_ack(web, first_retry=FIRST)
    apply_nack(db, NackStatus.NOT_AUTHORIZED, now=0.1)
    connection_lost([web, db])
    assert (web.registration, db.registration) == (PENDING, REFUSED)   # refused stays refused
    for svc in (web, db):
        svc.connector_up, svc.connector = True, "c1"
        reset_registration(svc, first_retry=FIRST)                     # the next connection
    assert [(s.registration, s.attempts, s.nack, s.connector_up) for s in (web, db)] == \
        [(PENDING, 0, None, None)] * 2
    assert _due([web, db], 50.0) == [("web", False), ("db", False)]
