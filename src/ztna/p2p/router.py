"""Probe routing for a P2P socket: which punch session a datagram belongs to, and whose
retransmit is due.

Every non-QUIC datagram on a P2P socket (first byte < 0x40) is offered here. A probe names
its session in the clear (``ztna.wire.probe.probe_session_of``); the router hands it to that
`PunchSession` and returns what the session wants sent. Everything else is counted by
reason and dropped: undecodable as a probe (``not_a_probe``), for a session we do not hold
(``unknown_session``), and what the sessions themselves dropped (bad MAC, stale txid, ...),
carried into totals here because a session is forgotten later.

Sessions are bounded (the oldest goes first) and, given a `linger`, forgotten that long
after they ended, so that late probes of a finished punch are still answered meanwhile.
A session can be *silenced*: it answers probes but retransmits nothing more (its owner gave
up on the punch). Each session's end (nominated or failed) is reported exactly once, in the
`Progress` that saw it. Pure: time is passed in, nothing is sent from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ztna.p2p.punch import PunchSession, Send
from ztna.wire.probe import probe_session_of

__all__ = ["SESSION_DROPS", "Progress", "ProbeRouter", "Route"]

# PunchStats counters that each mean "this probe was dropped".
SESSION_DROPS = ("bad_mac", "malformed", "wrong_session", "unknown_txid", "wrong_source",
                 "role_conflicts")

T = TypeVar("T")


@dataclass(slots=True)
class Route(Generic[T]):
    session: PunchSession
    tag: T                    # the owner's handle for the session (e.g. its service)
    timed: bool = True        # False once silenced: no more retransmits
    reported: bool = False    # its end was reported


@dataclass(frozen=True, slots=True)
class Progress(Generic[T]):
    """A session moved: send `sends` from the socket; `finished` is True once, when it ended."""

    route: Route[T]
    sends: list[Send]
    finished: bool = False


@dataclass
class ProbeRouter(Generic[T]):
    max_sessions: int
    linger: float | None = None     # forget ended sessions this long after (None: never)
    not_a_probe: int = 0
    unknown_session: int = 0
    session_drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SESSION_DROPS, 0))
    _routes: dict[int, Route[T]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._routes)

    def sessions(self) -> Iterator[PunchSession]:
        """Held sessions, oldest first."""
        return (r.session for r in self._routes.values())

    def get(self, session_id: int) -> Route[T] | None:
        return self._routes.get(session_id)

    def add(self, session: PunchSession, tag: T, *, now: float) -> Progress[T]:
        """Hold `session` (replacing one with the same id) and run its first timer."""
        route = Route(session, tag)
        self._routes.pop(session.session, None)
        self._routes[session.session] = route
        while len(self._routes) > self.max_sessions:
            self._routes.pop(next(iter(self._routes)))
        return self._progress(route, session.on_timer(now=now))

    def discard(self, session_id: int) -> None:
        """Forget a session: its probes are unknown from now on."""
        self._routes.pop(session_id, None)

    def silence(self, session_id: int) -> None:
        """Keep answering a session's probes, but retransmit nothing more for it."""
        route = self._routes.get(session_id)
        if route is not None:
            route.timed = False

    def route(self, data: bytes, addr: tuple[object, ...], *, now: float) -> Progress[T] | None:
        """A non-QUIC datagram from `addr`: the progress of the session it belongs to, or
        None (counted) when it belongs to none."""
        sid = probe_session_of(data)
        if sid is None:
            self.not_a_probe += 1
            return None
        route = self._routes.get(sid)
        if route is None:
            self.unknown_session += 1
            return None
        stats = route.session.stats
        before = [getattr(stats, name) for name in SESSION_DROPS]
        sends = route.session.on_datagram(data, addr, now=now)
        for name, old in zip(SESSION_DROPS, before, strict=True):
            self.session_drops[name] += getattr(stats, name) - old
        return self._progress(route, sends)

    def on_timer(self, *, now: float) -> list[Progress[T]]:
        """Run every session whose deadline has come."""
        out = []
        for route in list(self._routes.values()):
            deadline = route.session.next_deadline()
            if route.timed and deadline is not None and deadline <= now:
                out.append(self._progress(route, route.session.on_timer(now=now)))
        return out

    def next_deadline(self, *, now: float) -> float | None:
        """The earliest deadline of a timed session; forgets sessions past their linger."""
        deadline = None
        for sid, route in list(self._routes.items()):
            s = route.session
            d = s.next_deadline() if route.timed else None
            if d is None:
                ended = s.nominated_at or s.failed_at
                if (self.linger is not None and s.done
                        and now - (ended if ended is not None else now) > self.linger):
                    del self._routes[sid]
                continue
            deadline = d if deadline is None else min(deadline, d)
        return deadline

    def _progress(self, route: Route[T], sends: list[Send]) -> Progress[T]:
        finished = route.session.done and not route.reported
        if finished:
            route.reported = True
        return Progress(route, sends, finished)
