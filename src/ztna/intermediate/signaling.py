"""Hole-punch signaling in the Intermediate: sessions bound to one Agent and one Connector.

Theory of operation
-------------------
1. An Agent registered for service S sends ``PunchRequest(S, candidates)``. We pick the
   Connector that would carry its relay traffic (the registry's rendezvous choice), draw a
   session id (u64) and a 32-byte probe key from the injected ``rng``, and send that
   Connector ``PunchOffer(session, agent id, S, candidates)``.
2. That Connector — and only it — answers ``PunchAnswer(session, candidates)``. We then send
   ``PunchStart`` to both at once: the Agent is *controlling* and gets the Connector's
   candidates, the Connector is *controlled* and gets the Agent's; both get the key, which
   authenticates every probe (``ztna.wire.probe``), so probes from anyone else are ignored.
3. Either party may report ``PunchResult``; it is forwarded to the other one and closes
   the session.

Binding: session ids are ours, random, never chosen by a client; a message
about a session from any peer other than the two bound to it is ignored and counted, as is a
request from a peer not registered as Agent for the service. Bounded: at most
``max_per_agent`` live sessions per Agent (a new request for the same service replaces the
old one; beyond the bound the oldest goes) and ``max_sessions`` overall (then an error
goes back). Sessions expire ``ttl`` seconds after creation; a peer leaving ends its
sessions and the other party is told.

Pure: no I/O; time comes in as ``now``, randomness as ``rng(n) -> bytes``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ztna.intermediate.admin.snapshot import LatencyHistogram
from ztna.intermediate.registry import Notify, Registry
from ztna.metrics import MetricRow, MetricTable
from ztna.wire.control_messages import (
    Candidate,
    ErrorMessage,
    PunchAnswer,
    PunchOffer,
    PunchRequest,
    PunchResult,
    PunchStart,
    StandingCandidates,
)

__all__ = ["Signaling"]

SESSION_TTL: Final = 10.0          # probes stop after ~2 s; signaling takes a few RTTs
MAX_SESSIONS_PER_AGENT: Final = 8
MAX_SESSIONS: Final = 4096
START_IN_MS: Final = 0             # both sides start at once; retries absorb the skew

_IGNORE_REASONS: Final = ("not_agent", "not_bound", "unknown_session", "duplicate_answer",
                          "unexpected_type")


@dataclass(slots=True)
class _Session:
    session: int
    service: str
    agent: int
    connector: int
    key: bytes
    agent_candidates: tuple[Candidate, ...]
    created_at: float
    started: bool = False


@dataclass(slots=True)
class _Counters:
    sessions: int = 0
    started: int = 0
    expired: int = 0
    no_connector: int = 0
    busy: int = 0
    fast_starts: int = 0       # started from standing candidates (no offer/answer)
    results: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    ignored: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_IGNORE_REASONS, 0))


class Signaling:
    def __init__(
        self,
        *,
        rng: Callable[[int], bytes],
        ttl: float = SESSION_TTL,
        max_per_agent: int = MAX_SESSIONS_PER_AGENT,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.rng = rng
        self.ttl = ttl
        self.max_per_agent = max_per_agent
        self.max_sessions = max_sessions
        self.sessions: dict[int, _Session] = {}   # insertion order = creation order
        self.counters = _Counters()
        # Connector peer -> the candidates of its P2P socket (StandingCandidates).
        self.standing: dict[int, tuple[Candidate, ...]] = {}
        # (agent peer, service) -> (went direct, seconds from the request to the result): the
        # last punch outcome, the path the admin API shows ("where known": an Agent that later
        # falls back to the relay does not say so here). And the warm-up times of the
        # successful punches.
        self.outcomes: dict[tuple[int, str], tuple[bool, float]] = {}
        self.warmup = LatencyHistogram()

    # ------------------------------------------------------------------ entry points
    def handle(self, peer_id: int, msg: object, registry: Registry, *, now: float) -> list[Notify]:
        self._expire(now)
        if isinstance(msg, PunchRequest):
            return self._request(peer_id, msg, registry, now)
        if isinstance(msg, PunchAnswer):
            return self._answer(peer_id, msg)
        if isinstance(msg, PunchResult):
            return self._result(peer_id, msg, now)
        if isinstance(msg, StandingCandidates):
            if registry.peers.get(peer_id) is not None and registry.peers[peer_id].connector_services:
                self.standing[peer_id] = msg.candidates
            else:
                self.counters.ignored["not_bound"] += 1   # only registered Connectors publish
            return []
        self.counters.ignored["unexpected_type"] += 1  # PunchOffer/PunchStart from a client
        return []

    def peer_gone(self, peer_id: int) -> list[Notify]:
        self.standing.pop(peer_id, None)
        for key in [k for k in self.outcomes if k[0] == peer_id]:
            del self.outcomes[key]
        notes: list[Notify] = []
        for sid, s in list(self.sessions.items()):
            if peer_id not in (s.agent, s.connector):
                continue
            del self.sessions[sid]
            other = s.connector if peer_id == s.agent else s.agent
            if other != peer_id:
                notes.append(Notify(other, ErrorMessage(code="punch_aborted", message="peer left",
                                                        session=sid)))
        return notes

    def relayed(self, agent: int, service: str) -> None:
        """The Agent opened a flow of `service` through the relay: whatever its last punch
        said, its path is the relay now (a direct connection refused or lost after the punch
        succeeded is only seen this way)."""
        outcome = self.outcomes.get((agent, service))
        if outcome is not None and outcome[0]:
            self.outcomes[(agent, service)] = (False, outcome[1])

    # ------------------------------------------------------------------ messages
    def _request(self, peer_id: int, msg: PunchRequest, registry: Registry, now: float) -> list[Notify]:
        service = msg.service
        if not registry.is_agent_of(peer_id, service):
            self.counters.ignored["not_agent"] += 1
            return []
        # A direct path is a new flow: a healthy Connector (or the least-recently-failed).
        connector = registry.pick(service, peer_id.to_bytes(4, "big"))
        if connector is None:
            self.counters.no_connector += 1
            return [Notify(peer_id, ErrorMessage(code="no_connector",
                                                 message=f"no connector for {service}"))]
        # One live session per (agent, service): a new request replaces the old one.
        mine = [sid for sid, s in self.sessions.items() if s.agent == peer_id]
        for sid in mine:
            if self.sessions[sid].service == service:
                del self.sessions[sid]
                mine.remove(sid)
                break
        while len(mine) >= self.max_per_agent:
            del self.sessions[mine.pop(0)]
        if len(self.sessions) >= self.max_sessions:
            self.counters.busy += 1
            return [Notify(peer_id, ErrorMessage(code="busy", message="too many punch sessions"))]
        sid = self._new_id()
        key = self.rng(32)
        if len(key) != 32:
            raise ValueError("rng returned the wrong number of bytes")
        session = self.sessions[sid] = _Session(sid, service, peer_id, connector, key, msg.candidates, now)
        self.counters.sessions += 1
        standing = self.standing.get(connector)
        if standing:
            # The Connector published its candidates already: start both sides now.
            self.counters.fast_starts += 1
            return self._start(session, standing)
        return [Notify(connector, PunchOffer(session=sid, agent=peer_id, service=service,
                                             candidates=msg.candidates))]

    def _answer(self, peer_id: int, msg: PunchAnswer) -> list[Notify]:
        s = self.sessions.get(msg.session)
        if s is None:
            self.counters.ignored["unknown_session"] += 1
            return []
        if peer_id != s.connector:
            self.counters.ignored["not_bound"] += 1  # only the Connector we picked
            return []
        if s.started:
            self.counters.ignored["duplicate_answer"] += 1
            return []
        return self._start(s, msg.candidates)

    def _start(self, s: _Session, connector_candidates: tuple[Candidate, ...]) -> list[Notify]:
        s.started = True
        self.counters.started += 1
        key = s.key.hex()
        return [
            Notify(s.agent, PunchStart(session=s.session, service=s.service, role="controlling",
                                       key=key, peer_candidates=connector_candidates,
                                       start_in_ms=START_IN_MS)),
            Notify(s.connector, PunchStart(session=s.session, service=s.service, role="controlled",
                                           key=key, peer_candidates=s.agent_candidates,
                                           start_in_ms=START_IN_MS)),
        ]

    def _result(self, peer_id: int, msg: PunchResult, now: float) -> list[Notify]:
        s = self.sessions.get(msg.session)
        if s is None:
            self.counters.ignored["unknown_session"] += 1
            return []
        if peer_id not in (s.agent, s.connector):
            self.counters.ignored["not_bound"] += 1
            return []
        del self.sessions[msg.session]
        self.counters.results[msg.ok] += 1
        took = max(0.0, now - s.created_at)
        self.outcomes[(s.agent, s.service)] = (msg.ok, took)
        if msg.ok:
            self.warmup.observe(took)
        other = s.connector if peer_id == s.agent else s.agent
        return [Notify(other, msg)]

    # ------------------------------------------------------------------ helpers
    def _new_id(self) -> int:
        while True:
            sid = int.from_bytes(self.rng(8), "big")
            if sid not in self.sessions:
                return sid

    def _expire(self, now: float) -> None:
        while self.sessions:
            sid, s = next(iter(self.sessions.items()))
            if now - s.created_at < self.ttl:
                return
            del self.sessions[sid]
            self.counters.expired += 1

    def metrics(self) -> list[MetricRow]:
        c, t = self.counters, MetricTable()
        t.counter("ztna_signaling_sessions_total", "Punch sessions created", c.sessions)
        t.counter("ztna_signaling_sessions_started_total", "Punch sessions started (answer received)", c.started)
        t.gauge("ztna_signaling_sessions_active", "Live punch sessions", len(self.sessions))
        t.counter("ztna_signaling_sessions_expired_total", "Punch sessions expired", c.expired)
        t.counter("ztna_signaling_no_connector_total", "Punch requests without a connector", c.no_connector)
        t.counter("ztna_signaling_busy_total", "Punch requests refused at the session limit", c.busy)
        t.counter("ztna_signaling_fast_starts_total",
                  "Punch sessions started from the Connector's standing candidates", c.fast_starts)
        t.counters_by("ztna_signaling_results_total", "Punch results reported", "outcome",
                      [("direct" if ok else "failed", n) for ok, n in c.results.items()])
        t.counters_by("ztna_signaling_ignored_total", "Signaling messages ignored", "reason", c.ignored)
        return t.rows

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"session": s.session, "service": s.service, "agent": s.agent,
                 "connector": s.connector, "started": s.started} for s in self.sessions.values()]
