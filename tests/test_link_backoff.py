"""The one reconnect backoff (`ztna.link.Backoff`), with a seeded rng: the steps double
to the cap, the jitter stays in its band, and reset starts over."""

from __future__ import annotations

import random

from ztna.link import AGENT_JITTER, EQUAL_JITTER, Backoff


class _Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_steps_double_to_the_cap_and_reset() -> None:
    b = Backoff(initial=0.5, cap=4.0, rng=_Fixed(1.0), jitter=(1.0, 1.0))
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_jitter_bands() -> None:
    low = Backoff(initial=2.0, cap=10.0, rng=_Fixed(0.0), jitter=AGENT_JITTER)
    high = Backoff(initial=2.0, cap=10.0, rng=_Fixed(1.0), jitter=AGENT_JITTER)
    assert (low.next_delay(), high.next_delay()) == (1.0, 3.0)     # 50 %..150 %
    low = Backoff(initial=2.0, cap=10.0, rng=_Fixed(0.0), jitter=EQUAL_JITTER)
    high = Backoff(initial=2.0, cap=10.0, rng=_Fixed(1.0), jitter=EQUAL_JITTER)
    assert (low.next_delay(), high.next_delay()) == (1.0, 2.0)     # 50 %..100 %


def test_the_same_waits_as_the_two_loops_it_replaced() -> None:
    # The Agent slept delay * (0.5 + random()) with delay doubling up to the cap; the
    # Connector d / 2 + uniform(0, d / 2) with d = min(cap, base * 2**attempt).
    agent_rng, old_rng = random.Random(7), random.Random(7)
    b = Backoff(initial=0.2, cap=10.0, rng=agent_rng, jitter=AGENT_JITTER)
    delay, old = 0.2, []
    for _ in range(10):
        old.append(delay * (0.5 + old_rng.random()))
        delay = min(delay * 2, 10.0)
    assert [b.next_delay() for _ in range(10)] == old
    conn_rng, old_rng = random.Random(9), random.Random(9)
    b = Backoff(initial=0.5, cap=30.0, rng=conn_rng)
    expected = []
    for attempt in range(10):
        d = min(30.0, 0.5 * 2 ** attempt)
        expected.append(d / 2 + old_rng.uniform(0, d / 2))
    got = [b.next_delay() for _ in range(10)]
    assert [round(g, 12) for g in got] == [round(e, 12) for e in expected]
