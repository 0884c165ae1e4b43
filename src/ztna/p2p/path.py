"""Path manager for one service: relay ↔ direct, liveness of the direct path, warm-up metrics.

Theory of operation
-------------------
The relay (the QUIC connection to the Intermediate) always exists and carries traffic until
the direct path is proven, so nothing ever waits for a punch. Per service:

    RELAY ──punch_started──▶ PUNCHING ──punch_succeeded──▶ CONNECTING ──direct_up──▶ DIRECT
      ▲                         │ punch_failed                │ direct_failed          │
      │                         ▼                             ▼                        │
      └────── reset ─────── COOLDOWN ◀──────────── direct_failed ─────────────────────┘
                               │ retry due → want_punch()

* **Liveness of the direct path** (defects 14 and 16): a QUIC PING on the direct connection
  every `active_ping_interval` (0.2 s) while traffic flows, every `keepalive_interval`
  (5 s; QUIC idle 30 s, NAT keepalive ≤ 25 s) when idle. A PING not acknowledged within
  `ping_timeout` = 3·RTT + 200 ms (clamped to 0.3–1.0 s) declares the path dead exactly once
  (one deadline per PING, not a counter bumped per timer call): traffic is back on the relay
  within about a second.
* **Return to direct**: after a direct failure the path cools down `cooldown`
  seconds (30 s by default) and then wants a new punch. Failed punches (symmetric NAT)
  back off from `cooldown` doubling up to `max_cooldown`: no probe storm, no error storm.
* **Warm-up metrics**: each attempt records when it reached each phase (`PHASES`), relative
  to the start of the attempt; `warmup` is start → first byte received on the direct path.

Pure: time is passed in; the driver sends the PINGs it is told to and reports events.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from ztna.errors import UsageError

__all__ = ["PHASES", "PathConfig", "PathEvent", "PathManager", "PathState", "SendPing", "TRANSITIONS"]

PHASES: Final = ("qad", "candidates_sent", "first_probe", "validated", "direct_up", "first_byte")


class PathState(Enum):
    RELAY = "relay"
    PUNCHING = "punching"
    CONNECTING = "connecting"
    DIRECT = "direct"
    COOLDOWN = "cooldown"


class PathEvent(Enum):
    PUNCH_STARTED = "punch_started"
    PUNCH_SUCCEEDED = "punch_succeeded"
    PUNCH_FAILED = "punch_failed"
    DIRECT_UP = "direct_up"
    DIRECT_FAILED = "direct_failed"
    RESET = "reset"


S, E = PathState, PathEvent
TRANSITIONS: Final[dict[tuple[PathState, PathEvent], PathState]] = {
    (S.RELAY, E.PUNCH_STARTED): S.PUNCHING,
    (S.COOLDOWN, E.PUNCH_STARTED): S.PUNCHING,
    (S.PUNCHING, E.PUNCH_SUCCEEDED): S.CONNECTING,
    (S.PUNCHING, E.PUNCH_FAILED): S.COOLDOWN,
    (S.CONNECTING, E.DIRECT_UP): S.DIRECT,
    (S.CONNECTING, E.DIRECT_FAILED): S.COOLDOWN,
    (S.DIRECT, E.DIRECT_FAILED): S.COOLDOWN,
    **{(state, E.RESET): S.RELAY for state in S},
}
del S, E


@dataclass(frozen=True, slots=True)
class PathConfig:
    cooldown: float = 30.0            # after a failure, before trying direct again
    max_cooldown: float = 600.0       # cap of the backoff after repeated punch failures
    punch_timeout: float = 10.0       # signaling + checks; beyond that the attempt failed
    connect_timeout: float = 3.0      # direct QUIC handshake
    active_ping_interval: float = 0.2
    keepalive_interval: float = 5.0   # QUIC keepalive and NAT keepalive (<= 25 s)
    active_window: float = 1.0        # traffic sent this recently = "flowing"
    ping_timeout_min: float = 0.3
    ping_timeout_max: float = 1.0

    def __post_init__(self) -> None:
        if self.cooldown <= 0 or self.max_cooldown < self.cooldown or self.keepalive_interval > 25.0:
            raise UsageError("bad path configuration (cooldown, or NAT keepalive above 25 s)")


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send a QUIC PING with this id on the direct connection."""

    uid: int


class PathManager:
    def __init__(self, *, config: PathConfig | None = None, now: float) -> None:
        self.config = config or PathConfig()
        self.state = PathState.RELAY
        self.changed_at = now
        self.retry_at: float | None = None
        self.punch_failures = 0
        self.direct_failures = 0
        self.switches_to_direct = 0
        self.last_reason = ""
        self.attempt_started: float | None = None
        self.marks: dict[str, float] = {}
        self.last_phases: dict[str, float] = {}    # seconds from start, last completed attempt
        self.observations: list[tuple[str, float]] = []   # drained by the driver (histograms)
        self.rtt: float | None = None
        self._pings: dict[int, float] = {}
        self._next_uid = 1
        self._next_ping: float | None = None
        self._last_traffic = float("-inf")

    # ------------------------------------------------------------------ state machine
    def _fire(self, event: PathEvent, *, now: float, reason: str = "") -> bool:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            return False
        self.state = new
        self.changed_at = now
        if reason:
            self.last_reason = reason
        return True

    @property
    def direct(self) -> bool:
        return self.state is PathState.DIRECT

    def want_punch(self, *, now: float) -> bool:
        if self.state is PathState.RELAY:
            return True
        return self.state is PathState.COOLDOWN and self.retry_at is not None and now >= self.retry_at

    def punch_started(self, *, now: float, qad_at: float | None = None) -> None:
        if self._fire(PathEvent.PUNCH_STARTED, now=now):
            self.attempt_started = now
            self.marks = {"qad": 0.0 if qad_at is None or qad_at <= now else qad_at - now}
            self.retry_at = None

    def mark(self, phase: str, *, now: float) -> None:
        """Record the first time this attempt reached `phase` (one of PHASES)."""
        if phase not in PHASES:
            raise UsageError(f"unknown phase {phase!r}")
        if self.attempt_started is not None and phase not in self.marks:
            self.marks[phase] = now - self.attempt_started
            if phase == "first_byte":
                self.last_phases = dict(self.marks)
                self.observations += [(p, self.marks[p]) for p in PHASES if p in self.marks]

    def punch_succeeded(self, *, now: float) -> None:
        self.mark("validated", now=now)
        self._fire(PathEvent.PUNCH_SUCCEEDED, now=now)

    def punch_failed(self, *, now: float, reason: str = "no pair answered") -> None:
        if self._fire(PathEvent.PUNCH_FAILED, now=now, reason=reason):
            self.punch_failures += 1
            backoff = self.config.cooldown * 2 ** min(self.punch_failures - 1, 16)
            self.retry_at = now + min(backoff, self.config.max_cooldown)

    def direct_up(self, *, now: float, rtt: float | None = None) -> None:
        if self._fire(PathEvent.DIRECT_UP, now=now):
            self.mark("direct_up", now=now)
            self.switches_to_direct += 1
            self.punch_failures = 0
            self.rtt = rtt
            self._pings.clear()
            self._next_ping = now

    def direct_failed(self, *, now: float, reason: str) -> None:
        was_direct = self.state is PathState.DIRECT
        if self._fire(PathEvent.DIRECT_FAILED, now=now, reason=reason):
            if was_direct:
                self.direct_failures += 1
            self.retry_at = now + self.config.cooldown
            self._pings.clear()
            self._next_ping = None

    def reset(self, *, now: float) -> None:
        """The relay connection was lost: everything starts over from RELAY."""
        self._fire(PathEvent.RESET, now=now)
        self.retry_at = None
        self._pings.clear()
        self._next_ping = None

    # ------------------------------------------------------------------ direct liveness
    def traffic_sent(self, *, now: float) -> None:
        """Data went out on the direct path (called at most once per batch by the driver)."""
        if self._last_traffic + self.config.active_window <= now and self._next_ping is not None:
            # Traffic resumes after an idle spell: check the path soon, not in 5 s.
            self._next_ping = min(self._next_ping, now + self.config.active_ping_interval)
        self._last_traffic = now

    def ping_acked(self, uid: int, *, now: float, rtt: float | None = None) -> None:
        sent = self._pings.pop(uid, None)
        if sent is not None and rtt is None:
            rtt = now - sent
        if rtt is not None:
            self.rtt = rtt

    def heard(self, at: float, *, now: float, rtt: float | None = None) -> None:
        """Something arrived on the direct connection at `at`: every PING sent before it
        has been answered (a PING is ack-eliciting; any later packet proves the path)."""
        for uid, sent in list(self._pings.items()):
            if sent <= at:
                self.ping_acked(uid, now=now, rtt=rtt)

    def ping_timeout(self) -> float:
        rtt = self.rtt if self.rtt is not None else 0.1
        return min(max(3 * rtt + 0.2, self.config.ping_timeout_min), self.config.ping_timeout_max)

    def next_deadline(self) -> float | None:
        deadlines: list[float] = []
        if self.state is PathState.COOLDOWN and self.retry_at is not None:
            deadlines.append(self.retry_at)
        if self.state in (PathState.PUNCHING, PathState.CONNECTING):
            timeout = (self.config.punch_timeout if self.state is PathState.PUNCHING
                       else self.config.connect_timeout)
            deadlines.append(self.changed_at + timeout)
        if self.state is PathState.DIRECT:
            if self._next_ping is not None:
                deadlines.append(self._next_ping)
            if self._pings:
                deadlines.append(min(self._pings.values()) + self.ping_timeout())
        return min(deadlines) if deadlines else None

    def on_timer(self, *, now: float) -> list[SendPing]:
        state = self.state
        if state is PathState.PUNCHING and now >= self.changed_at + self.config.punch_timeout:
            self.punch_failed(now=now, reason="punch timed out")
            return []
        if state is PathState.CONNECTING and now >= self.changed_at + self.config.connect_timeout:
            self.direct_failed(now=now, reason="direct handshake timed out")
            return []
        if state is not PathState.DIRECT:
            return []
        if self._pings and now >= min(self._pings.values()) + self.ping_timeout():
            self.direct_failed(now=now, reason="direct path stopped answering")
            return []
        out: list[SendPing] = []
        if self._next_ping is not None and now >= self._next_ping:
            uid = self._next_uid
            self._next_uid += 1
            self._pings[uid] = now
            out.append(SendPing(uid))
            active = now - self._last_traffic < self.config.active_window
            interval = self.config.active_ping_interval if active else self.config.keepalive_interval
            self._next_ping = now + interval
        return out

    # ------------------------------------------------------------------ reporting
    @property
    def warmup(self) -> float | None:
        return self.last_phases.get("first_byte")

    def snapshot(self) -> dict[str, object]:
        warm = self.warmup
        return {
            "path": "direct" if self.direct else "relay",
            "path_state": self.state.value,
            "warmup_ms": round(warm * 1000, 1) if warm is not None else None,
            "phases_ms": {k: round(v * 1000, 1) for k, v in self.last_phases.items()},
            "direct_rtt_ms": round(self.rtt * 1000, 2) if self.rtt is not None and self.direct else None,
            "retry_at": self.retry_at,
            "punch_failures": self.punch_failures,
            "direct_failures": self.direct_failures,
            "switches_to_direct": self.switches_to_direct,
            "last_reason": self.last_reason,
        }
