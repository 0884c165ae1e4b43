"""The Connector's side of the per-flow audit log (`ztna.audit`): what it knows of a flow.

Relayed flows: the agent id (from the 0x30 header or `RelayedStreamOpen`), the service, the
protocol and port, bytes each way, the backend connect time; the Agent's identity and its
connection's setup are the Intermediate's to know (its audit line has them for relayed TCP
streams), so they are null here. Direct flows: also the Agent certificate's SANs and the
direct connection's handshake, registration and hole-punch times.
"""

from __future__ import annotations

from typing import Any, Literal

from ztna.audit import AuditLog, FlowAudit, sans_of
from ztna.connector.paths import ReplyPath


class ConnectorAudit:
    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def open(self, path: ReplyPath | None, service: str, protocol: Literal["tcp", "udp"],
             dst_port: int | None, now: float, *, conn: Any = None, agent_id: int | None = None,
             name: str | None = None) -> FlowAudit:
        """A flow starts on `path` (or, for streams, on connection `conn`: a direct
        connection's user is its ReplyPath, the relay connection's is not)."""
        if path is None and conn is not None and isinstance(conn.user, ReplyPath):
            path = conn.user
        direct = path is not None and path.direct
        if agent_id is None and path is not None:
            agent_id = path.agent_id
        return FlowAudit(self.log.new_id("c"), service=service, protocol=protocol,
                         path="direct" if direct else "relay", now=now, agent_id=agent_id,
                         identity=sans_of(path.conn) if direct and path is not None else None,
                         dst_port=dst_port, setup=dict(path.setup) if direct and path is not None else {},
                         name=name)

    def live(self, *tables: Any) -> list[FlowAudit]:
        """The audit state of every live flow (for the interim lines); stream counters are
        kept by the stream itself and copied here."""
        out: list[FlowAudit] = []
        for table in tables:
            for flow in list(table.flows.values()):
                audit = getattr(flow, "audit", None)
                if audit is None:
                    continue
                if hasattr(flow, "rx") and hasattr(flow, "tx"):
                    audit.to_service, audit.from_service = flow.rx, flow.tx
                out.append(audit)
        return out

    def end(self, flow: FlowAudit | None, reason: str, now: float) -> None:
        if flow is not None:
            self.log.end(flow, reason, now)
