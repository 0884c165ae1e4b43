"""The one reconnect backoff of the links to the Intermediate (and the P2P server's QAD
link): exponential, capped, jittered, with the randomness passed in.

The n-th consecutive wait (n = 0, 1, ...) is ``min(cap, initial * 2**n)`` times a factor
drawn uniformly from ``jitter`` = (low, high). The Agent waits 50 %..150 % of the step
(docs/agent.md), the Connector 50 %..100 % ("equal jitter": half fixed, half random, so
its waits never pass the cap). ``reset()`` after a connection that proved useful.
"""

from __future__ import annotations

from typing import Final, Protocol

__all__ = ["AGENT_JITTER", "EQUAL_JITTER", "Backoff"]

AGENT_JITTER: Final = (0.5, 1.5)
EQUAL_JITTER: Final = (0.5, 1.0)


class Random(Protocol):
    def random(self) -> float: ...


class Backoff:
    __slots__ = ("initial", "cap", "jitter", "rng", "failures")

    def __init__(self, *, initial: float, cap: float, rng: Random,
                 jitter: tuple[float, float] = EQUAL_JITTER) -> None:
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self.rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        """Seconds to wait now; the next call waits (up to) twice as long."""
        step = min(self.cap, self.initial * (2 ** min(self.failures, 30)))
        self.failures += 1
        low, high = self.jitter
        return step * (low + (high - low) * self.rng.random())

    def reset(self) -> None:
        self.failures = 0
