"""The one link machine (`ztna.link`) in memory, for both programs' policies: which
Registers are due when, what ACKs and NACKs do, the Connector's status words, the list of
Intermediates, the "moved" event, and the attempt / back off / fail over loop (no sockets:
the attempts are coroutines that say how the connection went)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ztna.link import Backoff
from ztna.link.driver import LinkEvents, LinkLoop
from ztna.link.registration import (
    ACKED,
    CONNECTOR_POLICY,
    PENDING,
    REFUSED,
    RegistrationPolicy,
    ServiceRegistration,
    apply_ack,
    apply_nack,
    connection_lost,
    connector_label,
    due_registrations,
    reset_registration,
)
from ztna.link.targets import Targets
from ztna.wire import NackStatus

AGENT_POLICY = RegistrationPolicy(first_retry=1.0, cap=8.0, nack_retry=None)


def _slots(*sids: str, policy: RegistrationPolicy) -> list[ServiceRegistration]:
    slots = [ServiceRegistration(sid) for sid in sids]
    for slot in slots:
        reset_registration(slot, policy)
    return slots


def _send_times(policy: RegistrationPolicy, until: float) -> list[float]:
    (slot,) = _slots("web", policy=policy)
    sent, now = [], 0.0
    while now <= until:
        if due_registrations([slot], now=now, policy=policy):
            sent.append(now)
        now = round(now + 0.25, 2)
    return sent


def test_the_connector_resends_every_two_seconds_and_the_agent_doubles_to_its_cap() -> None:
    assert _send_times(CONNECTOR_POLICY, 9.0) == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert _send_times(AGENT_POLICY, 40.0) == [0.0, 1.0, 3.0, 7.0, 15.0, 23.0, 31.0, 39.0]


@pytest.mark.parametrize("policy, retry_at", [(CONNECTOR_POLICY, 30.5), (AGENT_POLICY, 2.5)],
                         ids=["connector", "agent"])
def test_transient_nacks_retry_per_policy_and_final_ones_refuse(policy: RegistrationPolicy,
                                                                 retry_at: float) -> None:
    (slot,) = _slots("web", policy=policy)
    due_registrations([slot], now=0.0, policy=policy)       # the Agent's next delay: 2 s
    assert apply_nack(slot, NackStatus.SHUTTING_DOWN, now=0.5, policy=policy) is PENDING
    assert connector_label(slot) == "nack: SHUTTING_DOWN"
    assert due_registrations([slot], now=retry_at - 0.1, policy=policy) == []
    assert [(s.service_id, resend) for s, resend in
            due_registrations([slot], now=retry_at, policy=policy)] == [("web", True)]
    for final in (NackStatus.NOT_AUTHORIZED, NackStatus.INVALID_REQUEST, NackStatus.SERVICE_CONFLICT):
        assert apply_nack(slot, final, now=retry_at, policy=policy) is REFUSED
    assert connector_label(slot) == "refused: SERVICE_CONFLICT"
    assert due_registrations([slot], now=1e6, policy=policy) == []


def test_acks_and_reconnects_in_the_connectors_words() -> None:
    web, db = _slots("web", "db", policy=CONNECTOR_POLICY)
    assert [connector_label(s) for s in (web, db)] == ["pending", "pending"]
    due_registrations([web, db], now=0.0, policy=CONNECTOR_POLICY)
    assert apply_ack(web, CONNECTOR_POLICY) is True and apply_ack(web, CONNECTOR_POLICY) is False
    apply_nack(db, NackStatus.NOT_AUTHORIZED, now=0.1, policy=CONNECTOR_POLICY)
    assert [connector_label(s) for s in (web, db)] == ["registered", "refused: NOT_AUTHORIZED"]
    assert due_registrations([web, db], now=100.0, policy=CONNECTOR_POLICY) == []
    connection_lost([web, db])
    assert (web.registration, db.registration) == (PENDING, REFUSED)
    for slot in (web, db):
        reset_registration(slot, CONNECTOR_POLICY)           # the next connection
    assert [s.service_id for s, _ in due_registrations([web, db], now=200.0,
                                                        policy=CONNECTOR_POLICY)] == ["web", "db"]
    assert web.registration is PENDING and apply_ack(web, CONNECTOR_POLICY) and web.registration is ACKED


def test_targets_take_turns_and_one_target_stays() -> None:
    one = Targets([], current=("i1", 443))
    assert not one.fail_over() and one.current == ("i1", 443) and one.moves == 0
    many = Targets([("i1", 443), ("i2", 443), ("i3", 443)], current=("i2", 443))
    assert [many.fail_over() and many.current for _ in range(3)] == [("i3", 443), ("i1", 443), ("i2", 443)]
    assert many.moves == 3


def test_moved_fires_only_when_the_link_comes_up_elsewhere() -> None:
    events, seen = LinkEvents(), []
    events.moved.append(lambda old, new: seen.append((old, new)))
    for target in [("i1", 1), ("i1", 1), ("i2", 1), ("i2", 1), ("i1", 1)]:
        events.connected(target)
    assert seen == [(("i1", 1), ("i2", 1)), (("i2", 1), ("i1", 1))]


class _Fixed:
    def random(self) -> float:
        return 1.0


@pytest.mark.parametrize("reset_on_failover", [False, True], ids=["connector", "agent"])
def test_the_loop_backs_off_fails_over_and_resets_after_a_useful_connection(
        reset_on_failover: bool) -> None:
    """Attempts: fail, fail, useful, fail, then stop. Waits double, except where the
    policy resets them (a useful connection; for the Agent, every move)."""
    targets = Targets([("i1", 1), ("i2", 1)])
    backoff = Backoff(initial=1.0, cap=8.0, rng=_Fixed(), jitter=(1.0, 1.0))
    outcomes = [RuntimeError("refused"), False, True, False]
    tried: list[tuple[str, int]] = []
    waits: list[float] = []
    failures: list[str] = []

    async def attempt(target: tuple[str, int]) -> bool:
        tried.append(target)
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def sleep(delay: float) -> None:
        waits.append(delay)

    loop = LinkLoop(targets, backoff, log=logging.getLogger("test"), reset_on_failover=reset_on_failover)
    asyncio.run(loop.run(attempt, stopping=lambda: not outcomes, sleep=sleep,
                         on_failure=lambda exc: failures.append(str(exc)), on_retry=lambda d: None))
    assert tried == [("i1", 1), ("i2", 1), ("i1", 1), ("i2", 1)]
    assert failures == ["refused"]
    assert waits == ([1.0, 1.0, 1.0] if reset_on_failover else [1.0, 2.0, 1.0])
    assert targets.moves == 3
