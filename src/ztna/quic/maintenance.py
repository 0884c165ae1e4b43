"""Client-side connection upkeep: keepalive PINGs and periodic connection-ID rotation.

Why: a NAT forgets an idle UDP mapping (often after 30 s), so a client that must stay
reachable sends a PING every `limits.KEEPALIVE_INTERVAL`; and a client switches to a fresh
destination connection ID every `limits.CID_ROTATION_INTERVAL` so an on-path observer cannot
link its packets over a long session (RFC 9000 §9.5). The server issues spare CIDs with
NEW_CONNECTION_ID and `ztna.quic.endpoint` routes every issued CID, so a rotated client keeps
reaching its connection; the old CID is retired (RETIRE_CONNECTION_ID, and the
server issues a replacement, so rotation never runs dry).

`UpkeepSchedule` is the rule, pure (time passed in): a PING once nothing was heard from
the peer for `keepalive` seconds, repeated every `ping_gap` seconds (default: `keepalive`)
while the silence lasts (the ACK of a PING counts as heard, so an idle healthy connection
pings once per interval; a link that watches for a dead path pings more often when its
PINGs go unanswered), and a rotation every `cid_rotation` seconds.
The links to the Intermediate (the Agent's session, the Connector's relay link) ask it from
their supervision loops; `ConnectionUpkeep(conn, keepalive=..., cid_rotation=...)` runs it
as one small asyncio task per connection for clients without such a loop. Intervals are
parameters so tests can rotate every second; `None` disables one.
"""

from __future__ import annotations

import asyncio
import logging

from ztna import limits
from ztna.quic.connection import ZtnaConnection

log = logging.getLogger("ztna.quic")


def rotate_connection_id(conn: ZtnaConnection) -> bool:
    """Switch the connection to the next destination CID the peer issued.
    False when the peer has issued none to spare (nothing changes then)."""
    if conn.closed or not conn.handshake_complete:
        return False
    before = conn.current_dcid()
    conn.endpoint.native.rotate_cid(conn.handle)
    conn.endpoint.flush()           # the PING goes out now, on the new connection ID
    return conn.current_dcid() != before


class UpkeepSchedule:
    """When a client connection is due a keepalive PING and a CID rotation."""

    __slots__ = ("keepalive", "cid_rotation", "ping_gap", "last_ping", "next_rotate")

    def __init__(self, *, keepalive: float | None, cid_rotation: float | None, now: float,
                 ping_gap: float | None = None) -> None:
        self.keepalive = keepalive or None
        self.cid_rotation = cid_rotation or None
        self.ping_gap = self.keepalive if ping_gap is None else ping_gap
        self.last_ping = now
        self.next_rotate = now + self.cid_rotation if self.cid_rotation else None

    def due(self, *, now: float, last_received: float) -> tuple[bool, bool]:
        """(ping now, rotate now); what is returned counts as done."""
        ping = (self.keepalive is not None and now - last_received >= self.keepalive
                and now - self.last_ping >= (self.ping_gap or 0.0))
        if ping:
            self.last_ping = now
        rotate = self.next_rotate is not None and now >= self.next_rotate
        if rotate and self.cid_rotation is not None:
            self.next_rotate = now + self.cid_rotation
        return ping, rotate

    def next_deadline(self, *, last_received: float) -> float | None:
        deadlines = [d for d in (
            max(last_received + self.keepalive, self.last_ping + (self.ping_gap or 0.0))
            if self.keepalive else None,
            self.next_rotate) if d is not None]
        return min(deadlines) if deadlines else None


def run_upkeep(conn: ZtnaConnection, schedule: UpkeepSchedule, *, now: float) -> tuple[bool, bool]:
    """Do what `schedule` says is due on `conn`: (pinged, rotated to a new CID)."""
    if conn.closed:
        return False, False
    ping, rotate = schedule.due(now=now, last_received=conn.last_received)
    if ping:
        conn.ping()
    rotated = rotate and rotate_connection_id(conn)
    if rotated:
        log.debug("%r: rotated to a new connection ID", conn)
    return ping, rotated


class ConnectionUpkeep:
    """Keepalive and CID rotation for one established client connection."""

    def __init__(
        self,
        conn: ZtnaConnection,
        *,
        keepalive: float | None = limits.KEEPALIVE_INTERVAL,
        cid_rotation: float | None = limits.CID_ROTATION_INTERVAL,
    ) -> None:
        self.conn = conn
        self.keepalive = keepalive
        self.cid_rotation = cid_rotation
        self.rotations = 0
        self.pings = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> ConnectionUpkeep:
        if self._task is None and (self.keepalive or self.cid_rotation):
            self._task = asyncio.ensure_future(self._run())
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self.conn
        schedule = UpkeepSchedule(keepalive=self.keepalive, cid_rotation=self.cid_rotation,
                                  now=loop.time())
        while not conn.closed:
            deadline = schedule.next_deadline(last_received=conn.last_received)
            if deadline is None:
                return
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            pinged, rotated = run_upkeep(conn, schedule, now=loop.time())
            self.pings += pinged
            self.rotations += rotated
