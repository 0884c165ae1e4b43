"""Presence: which member holds which Connectors and Agents, for which services. Pure.

Each member publishes one record under a lease (`ztna:presence:<member>` in the store, expiring
after `limits.CLUSTER_LEASE` unless refreshed every `limits.CLUSTER_LEASE_REFRESH`), so a
member that dies vanishes from everyone's view when its lease runs out, and one that stops
gracefully withdraws its record at once. A record is JSON, version 1:

    {"v": 1, "member": "203.0.113.7:4433",
     "connectors": {"web": ["connector#3", "connector-2#9"]}, "agents": {"web": 2}}

`ClusterView` is the union every member computes from the same records, and `place` is the
decision every member makes the same way from it: rendezvous hashing of a flow key over the
union of the service's Connectors, each named globally as `member/label`. Because the inputs
and the hash are the same everywhere, every member picks the same Connector for a flow, and a
Connector that leaves moves only the flows it carried.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ztna.errors import DecodeError

VERSION = 1
MAX_RECORD = 256 * 1024      # a member's record larger than this is refused, not parsed


@dataclass(frozen=True, slots=True)
class Presence:
    member: str
    connectors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    agents: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({
            "v": VERSION, "member": self.member,
            "connectors": {s: list(c) for s, c in sorted(self.connectors.items())},
            "agents": dict(sorted(self.agents.items())),
        }, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Presence:
        if len(data) > MAX_RECORD:
            raise DecodeError(f"presence record of {len(data)} bytes (limit {MAX_RECORD})")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"presence record is not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("v") != VERSION:
            raise DecodeError("presence record of an unknown version")
        member, connectors, agents = obj.get("member"), obj.get("connectors"), obj.get("agents")
        if not isinstance(member, str) or not member:
            raise DecodeError("presence record without a member")
        if not isinstance(connectors, dict) or not all(
                isinstance(s, str) and isinstance(c, list) and all(isinstance(x, str) for x in c)
                for s, c in connectors.items()):
            raise DecodeError("presence record with malformed connectors")
        if not isinstance(agents, dict) or not all(
                isinstance(s, str) and isinstance(n, int) and n >= 0 for s, n in agents.items()):
            raise DecodeError("presence record with malformed agents")
        return cls(member, {s: tuple(c) for s, c in connectors.items()}, dict(agents))


def global_name(member: str, connector: str) -> str:
    return f"{member}/{connector}"


def place(flow_key: bytes, candidates: list[str]) -> str | None:
    """Rendezvous hashing: the candidate with the highest hash of (flow key, name)."""
    best: str | None = None
    best_score = b""
    for name in candidates:
        score = hashlib.blake2b(flow_key + name.encode(), digest_size=8).digest()
        if best is None or (score, name) > (best_score, best):
            best, best_score = name, score
    return best


class ClusterView:
    """The union of every member's presence (this member's own record included)."""

    def __init__(self, member: str) -> None:
        self.member = member
        self.records: dict[str, Presence] = {}

    def apply(self, own: Presence, remote: list[Presence]) -> None:
        """Replace the view: this member's current record plus the live leases of the others
        (a member missing from `remote` has expired or withdrawn)."""
        records = {p.member: p for p in remote if p.member != self.member}
        records[self.member] = own
        self.records = records

    def members(self) -> list[str]:
        return sorted(self.records)

    def connectors(self, service: str) -> list[str]:
        """Every Connector of `service` in the cluster, by global name, sorted."""
        return sorted(global_name(m, c) for m, p in self.records.items()
                      for c in p.connectors.get(service, ()))

    def services(self) -> dict[str, dict[str, object]]:
        names = {s for p in self.records.values() for s in (*p.connectors, *p.agents)}
        return {s: {"connectors": self.connectors(s),
                    "agents": {m: p.agents[s] for m, p in sorted(self.records.items()) if s in p.agents}}
                for s in sorted(names)}

    def place(self, service: str, flow_key: bytes) -> tuple[str, str] | None:
        """(member, connector label) every member picks for this flow, or None."""
        name = place(flow_key, self.connectors(service))
        if name is None:
            return None
        member, _, label = name.partition("/")    # HOST:PORT never holds a "/"
        return member, label
