"""The one timer of a P2P socket, as a pure schedule.

A P2P socket (``ztna.p2p_socket``) has three kinds of periodic work: its QAD connection to
the Intermediate (connect, give up on a handshake that does not finish, ping to keep the
NAT mapping and the observed address fresh, reconnect after a backoff), the refresh of the
host's interface addresses, and the retransmits of its punch sessions' probes. Rather than
one task or timer handle each, they are jobs with a due time here; the driver asks
``next_due()`` when to wake, takes ``due(now)`` and reports back what it did. Time is
always passed in, so the whole schedule is exercised in memory with a plain float clock.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Job", "P2PSchedule"]


class Job(StrEnum):
    QAD_CONNECT = "qad_connect"      # (re)open the QAD connection to the Intermediate
    QAD_TIMEOUT = "qad_timeout"      # its handshake did not finish in time: drop it
    QAD_PING = "qad_ping"            # keep the NAT mapping (and the QAD) alive
    INTERFACES = "interfaces"        # list the interface addresses again
    PROBES = "probes"                # a punch session's retransmit or deadline


class P2PSchedule:
    """Due times of the P2P socket's jobs; at most one due time per job."""

    __slots__ = ("keepalive", "interface_refresh", "handshake_timeout", "_at")

    def __init__(self, *, now: float, keepalive: float, interface_refresh: float,
                 handshake_timeout: float) -> None:
        self.keepalive = keepalive
        self.interface_refresh = interface_refresh
        self.handshake_timeout = handshake_timeout
        # Both start at once: the QAD connection and the first interface listing.
        self._at: dict[Job, float] = {Job.QAD_CONNECT: now, Job.INTERFACES: now}

    # ------------------------------------------------------------------ the timer
    def next_due(self) -> float | None:
        """When the earliest job is due (None: nothing scheduled)."""
        return min(self._at.values()) if self._at else None

    def due(self, now: float) -> list[Job]:
        """The jobs due at `now`, removed from the schedule, in the order of `Job`. Each
        handler reports back (e.g. `qad_pinged`), which schedules the job's next run."""
        jobs = [job for job in Job if job in self._at and self._at[job] <= now]
        for job in jobs:
            del self._at[job]
        return jobs

    def at(self, job: Job) -> float | None:
        return self._at.get(job)

    # ------------------------------------------------------------------ QAD connection
    def qad_connecting(self, now: float) -> None:
        """A connect started: it must finish its handshake within `handshake_timeout`."""
        self._at.pop(Job.QAD_CONNECT, None)
        self._at.pop(Job.QAD_PING, None)
        self._at[Job.QAD_TIMEOUT] = now + self.handshake_timeout

    def qad_up(self, now: float) -> None:
        """Handshake done: ping it every `keepalive` from now on."""
        self._at.pop(Job.QAD_TIMEOUT, None)
        self._at[Job.QAD_PING] = now + self.keepalive

    def qad_pinged(self, now: float) -> None:
        self._at[Job.QAD_PING] = now + self.keepalive

    def qad_down(self, now: float, retry_in: float) -> None:
        """The connection failed or closed: connect again after `retry_in` (the backoff's)."""
        self._at.pop(Job.QAD_TIMEOUT, None)
        self._at.pop(Job.QAD_PING, None)
        self._at[Job.QAD_CONNECT] = now + retry_in

    def qad_moved(self, now: float) -> None:
        """The link went to another Intermediate: connect to that one now."""
        self.qad_down(now, 0.0)

    # ------------------------------------------------------------------ interfaces
    def interfaces_listing(self) -> None:
        """A listing is under way (it runs in a thread): no refresh is due meanwhile."""
        self._at.pop(Job.INTERFACES, None)

    def interfaces_listed(self, now: float) -> None:
        self._at[Job.INTERFACES] = now + self.interface_refresh

    # ------------------------------------------------------------------ probes
    def probes_at(self, deadline: float | None) -> None:
        """The punch sessions' earliest deadline (from the probe router), or None."""
        if deadline is None:
            self._at.pop(Job.PROBES, None)
        else:
            self._at[Job.PROBES] = deadline
