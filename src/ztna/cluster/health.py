"""Whether the cluster store answers: a small state machine, pure (time passed in).

Every failure of a store call (`failed`) or success (`succeeded`) feeds it; it says when the
state flips, so the driver logs each outage once and each recovery once, and it counts the
failures for the metrics. While `up` is False the ticket backend refuses 0-RTT at once instead
of waiting on a dead store."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StoreHealth:
    up: bool = True
    since: float = 0.0           # when the current state began
    failures: int = 0            # store calls that failed, in total
    outages: int = 0             # transitions up -> down
    last_error: str = ""

    def failed(self, now: float, error: str) -> bool:
        """A call failed; True when this starts an outage (log it then, once)."""
        self.failures += 1
        self.last_error = error
        if not self.up:
            return False
        self.up = False
        self.since = now
        self.outages += 1
        return True

    def succeeded(self, now: float) -> bool:
        """A call succeeded; True when this ends an outage."""
        if self.up:
            return False
        self.up = True
        self.since = now
        return True
