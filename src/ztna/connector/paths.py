"""Reply paths: where a flow's packets go back to, and which flows belong to one Agent.

A flow arrives either through the relay (a 0x30 DATAGRAM naming the Agent) or on a direct
P2P connection (a 0x2F DATAGRAM). One `ReplyPath` per (connection, agent): 0x31 + agent id
on the relay connection, the bare IP packet on a direct one.

Flows are keyed by **(agent id, inner 5-tuple)**, not by path: the Agent moves a service
between the relay and its direct connection at any moment (punch succeeded, direct path
died), and the same TCP connection must go on. The agent id is the same on both paths: the
Intermediate derives it from the Agent certificate and its `Hello.instance`
(`ztna.identity.stable_peer_id`), and the Connector does the same with the `Hello` the Agent
sends first on each direct connection. A flow answers on the path its most recent packet
came from (`flow.path`); when that path dies, `AgentPaths.alternate` names the other live
path of the same Agent, and only a flow with no path left is torn down.

A Connector attached to several Intermediates at once (`--attach all`) hears agent ids from
each, and two Intermediates may give the same id to different Agents. So the "agent" part
of a flow key is really `ReplyPath.key`, the agent id within the namespace of the link it
came through: link 0 (the first Intermediate, and the only one otherwise) keeps the bare
agent id, link n adds n << 32. A direct connection joins the namespace of the one link its
agent id is relayed on (several or none: link 0), so relay ↔ direct moves keep working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ztna.errors import DatagramTooLarge
from ztna.wire.tunnel import FROM_CONNECTOR_OVERHEAD, from_connector_prefix

if TYPE_CHECKING:
    from ztna.quic.connection import ZtnaConnection

RELAY_REPLY_OVERHEAD = FROM_CONNECTOR_OVERHEAD   # 0x31 v1 + agent id (docs/protocol.md §3.5)


def owner_key(link: int, agent_id: int) -> int:
    """An agent id within the namespace of relay link `link` (see the module's docstring)."""
    return (link << 32) | agent_id


class ReplyPath:
    __slots__ = ("conn", "agent_id", "direct", "link", "prefix", "overhead", "alive", "label", "flows",
                 "setup", "__weakref__")

    def __init__(self, conn: ZtnaConnection, agent_id: int | None, *, direct: bool = False,
                 link: int = 0) -> None:
        self.conn = conn
        self.link = link        # the relay link whose agent-id namespace this path is in
        # None only on a direct connection whose Hello has not arrived yet (no flows then).
        self.agent_id = agent_id
        self.direct = direct
        if direct:
            self.prefix = b""
        else:
            assert agent_id is not None
            self.prefix = from_connector_prefix(agent_id)
        self.overhead = len(self.prefix)
        self.alive = True
        self.label = (f"agent {agent_id} via relay" + (f" {link}" if link else "")) if not direct \
            else f"direct {conn.label}"
        self.flows = 0          # open flows whose replies use this path (bookkeeping)
        # Direct connections: how their setup went, in ms (handshake, registration, punch),
        # for the audit log's lines of the flows on it.
        self.setup: dict[str, float | None] = {}

    @property
    def key(self) -> int | None:
        """The agent part of this path's flow keys (None: a direct path before its Hello)."""
        return None if self.agent_id is None else owner_key(self.link, self.agent_id)

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
        """MSS clamping (wave-2 decision): live payload − reply header − IP − TCP − options.
        Always with the relay's header: a flow that starts direct may move to the relay."""
        overhead = max(self.overhead, RELAY_REPLY_OVERHEAD)
        return self.conn.max_datagram_payload() - overhead - (20 if ip_version == 4 else 40) - 20 - 12

    def __repr__(self) -> str:
        return f"<ReplyPath {self.label}>"


class AgentPaths:
    """The live paths per agent (`ReplyPath.key`): its relay path and its direct connections."""

    def __init__(self) -> None:
        self.relay: dict[int, ReplyPath] = {}
        self.direct: dict[int, list[ReplyPath]] = {}
        self.links = 1          # relay links (agent-id namespaces)

    def relay_path(self, conn: ZtnaConnection, agent_id: int, link: int = 0) -> ReplyPath:
        key = owner_key(link, agent_id)
        path = self.relay.get(key)
        if path is None or path.conn is not conn or not path.alive:
            path = self.relay[key] = ReplyPath(conn, agent_id, link=link)
        return path

    def add_direct(self, path: ReplyPath) -> None:
        assert path.agent_id is not None
        if self.links > 1:
            relayed = [n for n in range(self.links)
                       if owner_key(n, path.agent_id) in self.relay]
            path.link = relayed[0] if len(relayed) == 1 else 0
        key = owner_key(path.link, path.agent_id)
        paths = self.direct.setdefault(key, [])
        paths[:] = [p for p in paths if p.alive]
        paths.append(path)

    def remove(self, path: ReplyPath) -> None:
        key = path.key
        if key is None:
            return
        if path.direct:
            paths = [p for p in self.direct.get(key, ()) if p is not path and p.alive]
            if paths:
                self.direct[key] = paths
            else:
                self.direct.pop(key, None)
        elif self.relay.get(key) is path:
            del self.relay[key]

    def alternate(self, dead: ReplyPath, relay_conn: ZtnaConnection | None) -> ReplyPath | None:
        """Another live path of the same Agent: its newest direct connection, else the relay
        (created on demand while `relay_conn`, the relay connection of the dead path's link,
        is up — the Agent falls back to it)."""
        key, aid = dead.key, dead.agent_id
        if key is None or aid is None:
            return None
        for p in reversed(self.direct.get(key, ())):
            if p is not dead and p.alive and not p.conn.closed:
                return p
        if relay_conn is not None and not relay_conn.closed and (dead.direct or dead.conn is not relay_conn):
            return self.relay_path(relay_conn, aid, dead.link)
        return None

    def sweep(self) -> None:
        for key in [k for k, p in self.relay.items() if not p.alive]:
            del self.relay[key]
        for key in list(self.direct):
            alive = [p for p in self.direct[key] if p.alive]
            if alive:
                self.direct[key] = alive
            else:
                del self.direct[key]
