"""Reply paths: where a flow's packets go back to.

A flow arrives either through the relay (a 0x30 DATAGRAM naming the Agent) or on a direct
P2P connection (a 0x2F DATAGRAM). Its replies must leave on the same path: 0x31 + agent id
on the relay connection, the bare IP packet on the direct one. One `ReplyPath` object per
(connection, agent) is shared by all flows of that Agent, so the flow key can hold the path
object itself (hashed by identity) and a dead connection kills exactly its flows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ztna.errors import DatagramTooLarge

if TYPE_CHECKING:
    from ztna.quic.connection import ZtnaConnection


class ReplyPath:
    __slots__ = ("conn", "agent_id", "prefix", "overhead", "alive", "label", "flows",
                 "__weakref__")

    def __init__(self, conn: ZtnaConnection, agent_id: int | None) -> None:
        self.conn = conn
        self.agent_id = agent_id
        # 0x31 v1 + agent id (docs/protocol.md §3.5); a direct path carries bare packets.
        self.prefix = b"" if agent_id is None else b"\x31\x01" + agent_id.to_bytes(4, "big")
        self.overhead = len(self.prefix)
        self.alive = True
        self.label = f"agent {agent_id} via relay" if agent_id is not None else f"direct {conn.label}"
        self.flows = 0          # open flows on this path (for cleanup bookkeeping)

    @property
    def direct(self) -> bool:
        return self.agent_id is None

    def max_packet(self) -> int:
        """Largest inner IP packet this path carries right now."""
        return self.conn.max_datagram_payload() - self.overhead

    def budget(self) -> int:
        return self.conn.datagram_budget()

    def send(self, packet: bytes) -> bool:
        """Queue one IP packet toward the Agent. False if it cannot go (too big, dead)."""
        if not self.alive:
            return False
        try:
            self.conn.send_datagram(self.prefix + packet if self.prefix else packet)
        except DatagramTooLarge:
            return False
        return True

    def tcp_mss(self, ip_version: int) -> int:
        """MSS clamping (wave-2 decision): live payload − reply header − IP − TCP − options."""
        return self.max_packet() - (20 if ip_version == 4 else 40) - 20 - 12

    def __repr__(self) -> str:
        return f"<ReplyPath {self.label}>"
