"""Path manager: failover within ~1 s, return after cooldown, backoff, warm-up phases."""

from __future__ import annotations

import pytest

from ztna.p2p.path import (
    PHASES,
    TRANSITIONS,
    PathConfig,
    PathEvent,
    PathManager,
    PathState,
    SendPing,
)


def _direct(cfg: PathConfig | None = None) -> PathManager:
    pm = PathManager(config=cfg or PathConfig(cooldown=2.0), now=0.0)
    assert pm.want_punch(now=0.0)
    pm.punch_started(now=0.0)
    pm.mark("candidates_sent", now=0.001)
    pm.mark("first_probe", now=0.02)
    pm.punch_succeeded(now=0.06)
    pm.direct_up(now=0.09, rtt=0.02)
    pm.mark("first_byte", now=0.1)
    assert pm.direct
    return pm


def test_warmup_phases_recorded_once() -> None:
    pm = _direct()
    assert pm.warmup == pytest.approx(0.1)
    assert list(pm.last_phases) == list(PHASES)
    assert [p for p, _ in pm.observations] == list(PHASES)
    pm.mark("first_byte", now=5.0)  # later bytes do not move it
    assert pm.warmup == pytest.approx(0.1)
    snap = pm.snapshot()
    assert snap["path"] == "direct" and snap["warmup_ms"] == 100.0


def _run(pm: PathManager, until: float, *, ack: bool, traffic: bool = True) -> list[float]:
    pings = []
    now = pm.changed_at
    while now < until and pm.direct:
        deadline = pm.next_deadline()
        assert deadline is not None
        now = max(now, deadline)
        if traffic:
            pm.traffic_sent(now=now)
        for action in pm.on_timer(now=now):
            assert isinstance(action, SendPing)
            pings.append(now)
            if ack:
                pm.ping_acked(action.uid, now=now + 0.02)
    return pings


def test_active_path_pings_fast_and_stays_up_while_acked() -> None:
    pm = _direct()
    pings = _run(pm, 10.0, ack=True)
    assert pm.direct
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) == pytest.approx(0.2)


def test_idle_path_keeps_nat_alive_below_25s() -> None:
    pm = _direct()
    pings = _run(pm, 120.0, ack=True, traffic=False)
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert pm.direct and max(gaps) <= 25.0 and max(gaps) == pytest.approx(5.0)


def test_dead_direct_path_falls_back_within_a_second_then_returns() -> None:
    pm = _direct()
    _run(pm, 3.0, ack=True)
    t_block = pm.next_deadline()
    _run(pm, 10.0, ack=False)   # the path stops answering
    assert pm.state is PathState.COOLDOWN
    assert pm.changed_at - t_block <= 1.0       # about a second, once
    assert pm.direct_failures == 1
    assert not pm.want_punch(now=pm.changed_at + 1.9)
    assert pm.want_punch(now=pm.changed_at + 2.0)  # it does try again
    pm.punch_started(now=pm.changed_at + 2.0)
    pm.punch_succeeded(now=pm.changed_at + 0.05)
    pm.direct_up(now=pm.changed_at + 0.05)
    assert pm.direct and pm.switches_to_direct == 2


def test_punch_failures_back_off() -> None:
    pm = PathManager(config=PathConfig(cooldown=30.0, max_cooldown=100.0), now=0.0)
    waits = []
    now = 0.0
    for _ in range(4):
        pm.punch_started(now=now)
        pm.punch_failed(now=now + 2.0)
        waits.append(pm.retry_at - (now + 2.0))
        now = pm.retry_at
        assert pm.want_punch(now=now)
    assert waits == [30.0, 60.0, 100.0, 100.0]


def test_timeouts_of_signaling_and_handshake() -> None:
    pm = PathManager(config=PathConfig(cooldown=2.0), now=0.0)
    pm.punch_started(now=0.0)
    assert pm.next_deadline() == 10.0
    pm.on_timer(now=10.0)
    assert pm.state is PathState.COOLDOWN and pm.last_reason == "punch timed out"
    pm.punch_started(now=pm.retry_at)
    pm.punch_succeeded(now=pm.changed_at)
    pm.on_timer(now=pm.changed_at + 3.0)
    assert pm.state is PathState.COOLDOWN


def test_reset_and_table() -> None:
    pm = _direct()
    pm.reset(now=1.0)
    assert pm.state is PathState.RELAY and pm.want_punch(now=1.0)
    assert all(TRANSITIONS[(s, PathEvent.RESET)] is PathState.RELAY for s in PathState)
    assert (PathState.RELAY, PathEvent.DIRECT_UP) not in TRANSITIONS
    pm.direct_up(now=2.0)  # ignored: not in the table
    assert pm.state is PathState.RELAY
