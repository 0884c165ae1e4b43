"""RFC 6298 retransmission-timeout estimator (SRTT/RTTVAR, Karn's backoff).

Samples come only from segments never retransmitted (the caller enforces Karn's rule).
The backoff is cleared when an ACK makes forward progress (Linux does the same; without
it, a lossy path compounds the backoff into minute-long stalls). The minimum is 200 ms
rather than RFC 6298's 1 s: the tunnel's RTT is measured on every flow and a 1 s floor
would make each loss cost a second; Linux uses 200 ms too.
"""

from __future__ import annotations

from typing import Final

__all__ = ["RttEstimator", "RTO_MIN", "RTO_MAX", "RTO_INITIAL"]

RTO_INITIAL: Final = 1.0
RTO_MIN: Final = 0.2
RTO_MAX: Final = 60.0
_CLOCK_GRANULARITY: Final = 0.001


class RttEstimator:
    __slots__ = ("srtt", "rttvar", "base", "shift")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.base = RTO_INITIAL      # the RFC 6298 value before backoff
        self.shift = 0               # timeouts since the last forward progress

    @property
    def rto(self) -> float:
        return min(self.base * (1 << self.shift), RTO_MAX)

    def sample(self, rtt: float) -> None:
        rtt = max(rtt, 0.0)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        rto = self.srtt + max(_CLOCK_GRANULARITY, 4 * self.rttvar)
        self.base = min(max(rto, RTO_MIN), RTO_MAX)

    def backoff(self) -> None:
        if self.rto < RTO_MAX:
            self.shift += 1

    def progress(self) -> None:
        """New data was acknowledged: the path works again, drop the backoff (as Linux does)."""
        self.shift = 0
