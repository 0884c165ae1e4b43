"""Client-side connection upkeep: keepalive PINGs and periodic connection-ID rotation.

Why: a NAT forgets an idle UDP mapping (often after 30 s), so a client that must stay
reachable sends a PING every `limits.KEEPALIVE_INTERVAL`; and a client switches to a fresh
destination connection ID every `limits.CID_ROTATION_INTERVAL` so an on-path observer cannot
link its packets over a long session (RFC 9000 §9.5). The server issues spare CIDs with
NEW_CONNECTION_ID and `ztna.quic.endpoint` routes every issued CID, so a rotated client keeps
reaching its connection; the old CID is retired (RETIRE_CONNECTION_ID, and the
server issues a replacement, so rotation never runs dry).

`ConnectionUpkeep(conn, keepalive=..., cid_rotation=...)` runs one small asyncio task per
connection; intervals are parameters so tests can rotate every second. `None` disables one.
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
        now = loop.time()
        next_ping = now + self.keepalive if self.keepalive else None
        next_rotate = now + self.cid_rotation if self.cid_rotation else None
        conn = self.conn
        while not conn.closed:
            deadlines = [d for d in (next_ping, next_rotate) if d is not None]
            await asyncio.sleep(max(0.0, min(deadlines) - loop.time()))
            now = loop.time()
            if conn.closed:
                return
            if next_ping is not None and now >= next_ping and self.keepalive:
                conn.ping()
                self.pings += 1
                next_ping = now + self.keepalive
            if next_rotate is not None and now >= next_rotate and self.cid_rotation:
                if rotate_connection_id(conn):
                    self.rotations += 1
                    log.debug("%r: rotated to a new connection ID", conn)
                next_rotate = now + self.cid_rotation
