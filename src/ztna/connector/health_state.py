"""Backend health: the pure state machines (no I/O, time passed in as `now`).

* `CheckState` turns one check's outcomes into a state: healthy at start; down after `fall`
  consecutive failures, up again after `rise` consecutive successes.
* `ServiceHealthState` folds a service's checks: healthy while every check is; each service
  transition is returned once, for the driver (`ztna.connector.health`) to report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckState", "ServiceHealthState"]


@dataclass(slots=True)
class CheckState:
    """One check's up/down state from consecutive outcomes (pure)."""

    name: str
    fall: int = 3
    rise: int = 2
    healthy: bool = True
    failures: int = 0          # consecutive
    successes: int = 0         # consecutive
    last_detail: str = ""
    last_change: float | None = None
    checks: int = 0

    def observe(self, ok: bool, detail: str, now: float) -> bool | None:
        """Feed one outcome; the new state when it changed, else None."""
        self.checks += 1
        self.last_detail = detail
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.healthy and self.successes >= self.rise:
                self.healthy = True
                self.last_change = now
                return True
        else:
            self.failures += 1
            self.successes = 0
            if self.healthy and self.failures >= self.fall:
                self.healthy = False
                self.last_change = now
                return False
        return None


@dataclass(slots=True)
class ServiceHealthState:
    """A service's health: every one of its checks healthy (pure). No checks: always healthy."""

    service: str
    checks: list[CheckState] = field(default_factory=list)
    healthy: bool = True
    transitions: int = 0

    def observe(self, index: int, ok: bool, detail: str, now: float) -> bool | None:
        """Feed check `index`'s outcome; the service's new state when it changed."""
        self.checks[index].observe(ok, detail, now)
        healthy = all(c.healthy for c in self.checks)
        if healthy == self.healthy:
            return None
        self.healthy = healthy
        self.transitions += 1
        return healthy

    def detail(self) -> str:
        """Why the service is in its state: the failing checks, or the last outcome."""
        failing = [f"{c.name}: {c.last_detail}" for c in self.checks if not c.healthy]
        text = "; ".join(failing) if failing else "ok"
        return text[:256]

    def snapshot(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "transitions": self.transitions,
                "checks": [{"check": c.name, "healthy": c.healthy, "last": c.last_detail,
                            "checks": c.checks} for c in self.checks]}
