"""The admin API's JSON bodies (Pydantic), and how a `Snapshot` becomes them.

The OpenAPI document (`openapi()`) is generated from these models, so what the API answers
and what it documents cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from ztna.intermediate.admin.snapshot import BUCKETS_MS, HistogramView, Snapshot

API_VERSION = "1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConnectorInfo(_Model):
    id: int = Field(description="peer id of the Connector's connection")
    identity: str = Field(description="certificate common name")
    healthy: bool = Field(description="the Connector's health report for this service (true when none)")
    draining: bool = Field(description="drained by an administrator: no new flows")
    address: str
    flows: int = Field(description="open relayed flows of this service through it")


class AgentInfo(_Model):
    id: int
    identity: str
    path: Literal["direct", "relay"] = Field(description="last known path to the service")
    warmup_ms: float | None = Field(description="punch request to direct path, when it went direct")


class ServiceInfo(_Model):
    service: str
    connectors: list[ConnectorInfo]
    agents: list[AgentInfo]


class ConnectionInfo(_Model):
    peer: int = Field(description="peer id")
    identity: str = Field(description="certificate common name")
    sans: list[str] = Field(description="the certificate's subject alternative names")
    role: Literal["agent", "connector", "agent+connector", "none"]
    services: list[str] = Field(description="services registered on this connection")
    address: str
    rtt_ms: float | None
    bytes_sent: int = Field(description="UDP payload bytes sent to the peer")
    bytes_received: int = Field(description="UDP payload bytes received from the peer")
    path: Literal["direct", "relay"] | None = Field(
        description="Agents: direct when a punch to a Connector succeeded (its traffic then bypasses"
                    " this server), else relay; null for Connectors")
    connected_since: dt.datetime


class FlowInfo(_Model):
    agent: int
    connector: int | None
    service: str
    destination: str
    bytes_up: int = Field(description="Agent to Connector")
    bytes_down: int = Field(description="Connector to Agent")
    started: dt.datetime
    ended: dt.datetime | None
    state: Literal["open", "closed"]


class Bucket(_Model):
    le_ms: float | None = Field(description="upper bound in ms; null for the overflow bucket")
    count: int


class HistogramInfo(_Model):
    count: int
    sum_ms: float
    p50_ms: float | None
    p95_ms: float | None
    buckets: list[Bucket]


class Histograms(_Model):
    handshake: HistogramInfo = Field(description="first packet to verified handshake, per connection")
    warmup: HistogramInfo = Field(description="punch request to direct path, per successful punch")


class DashboardState(_Model):
    """One server-sent event of `/api/v1/events`: everything the dashboard shows."""

    taken_at: dt.datetime
    services: list[ServiceInfo]
    connections: list[ConnectionInfo]
    flows: list[FlowInfo]
    histograms: Histograms
    relayed_bytes: int


class DrainRequest(_Model):
    drain: bool = True


class DrainResult(_Model):
    id: int
    draining: bool


class DisconnectResult(_Model):
    identity: str
    closed: int


class ErrorBody(_Model):
    error: str


# ---------------------------------------------------------------------- from a Snapshot
def _time(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


def services(snap: Snapshot) -> list[ServiceInfo]:
    open_flows: dict[tuple[str, int], int] = {}
    for f in snap.flows:
        if f.ended_at is None and f.connector_id is not None:
            open_flows[(f.service, f.connector_id)] = open_flows.get((f.service, f.connector_id), 0) + 1
    out = []
    for name in sorted(set(snap.pools) | set(snap.agents)):
        connectors = []
        for cid in snap.pools.get(name, ()):
            c = snap.connections.get(cid)
            if c is None:
                continue
            connectors.append(ConnectorInfo(
                id=cid, identity=c.identity, healthy=c.health.get(name, True), draining=c.draining,
                address=c.address, flows=open_flows.get((name, cid), 0)))
        agents = []
        for aid in snap.agents.get(name, ()):
            a = snap.connections.get(aid)
            if a is None:
                continue
            path: Literal["direct", "relay"] = "direct" if a.paths.get(name) == "direct" else "relay"
            agents.append(AgentInfo(id=aid, identity=a.identity, path=path,
                                    warmup_ms=a.warmup_ms.get(name)))
        out.append(ServiceInfo(service=name, connectors=connectors, agents=agents))
    return out


def connections(snap: Snapshot) -> list[ConnectionInfo]:
    out = []
    for c in sorted(snap.connections.values(), key=lambda v: v.connected_at):
        path: Literal["direct", "relay"] | None = None
        if c.agent_services:
            path = "direct" if "direct" in c.paths.values() else "relay"
        out.append(ConnectionInfo(
            peer=c.peer_id, identity=c.identity, sans=list(c.sans), role=c.role,  # type: ignore[arg-type]
            services=sorted(set(c.agent_services) | set(c.connector_services)), address=c.address,
            rtt_ms=c.rtt_ms, bytes_sent=c.bytes_sent, bytes_received=c.bytes_received, path=path,
            connected_since=_time(c.connected_at)))
    return out


def flows(snap: Snapshot, limit: int | None = None) -> list[FlowInfo]:
    items = snap.flows if limit is None else snap.flows[:limit]
    return [FlowInfo(agent=f.agent_id, connector=f.connector_id, service=f.service,
                     destination=f.destination, bytes_up=f.bytes_up, bytes_down=f.bytes_down,
                     started=_time(f.started_at),
                     ended=_time(f.ended_at) if f.ended_at is not None else None,
                     state="open" if f.ended_at is None else "closed") for f in items]


def histogram(view: HistogramView) -> HistogramInfo:
    bounds: list[float | None] = [*BUCKETS_MS, None]
    return HistogramInfo(count=view.total, sum_ms=round(view.sum_ms, 3), p50_ms=view.quantile(0.5),
                         p95_ms=view.quantile(0.95),
                         buckets=[Bucket(le_ms=b, count=n) for b, n in zip(bounds, view.counts, strict=True)])


def histograms(snap: Snapshot) -> Histograms:
    return Histograms(handshake=histogram(snap.handshake), warmup=histogram(snap.warmup))


def dashboard(snap: Snapshot, flow_limit: int = 50) -> DashboardState:
    return DashboardState(taken_at=_time(snap.taken_at), services=services(snap),
                          connections=connections(snap), flows=flows(snap, flow_limit),
                          histograms=histograms(snap), relayed_bytes=snap.relayed_bytes)


# ---------------------------------------------------------------------- OpenAPI
# (method, path, summary, response model, list?, request model, needs a token always)
ROUTES: list[tuple[str, str, str, type[BaseModel], bool, type[BaseModel] | None, bool]] = [
    ("get", "/api/v1/services", "Services with their Connectors (health, flows) and Agents",
     ServiceInfo, True, None, False),
    ("get", "/api/v1/connections", "Every connection: identity, role, RTT, bytes, path",
     ConnectionInfo, True, None, False),
    ("get", "/api/v1/flows", "Open relayed flows, then the most recent closed ones", FlowInfo, True, None, False),
    ("get", "/api/v1/histograms", "Handshake and warm-up latency histograms", Histograms, False, None, False),
    ("get", "/api/v1/events", "Server-sent events: one DashboardState per second", DashboardState, False,
     None, False),
    ("post", "/api/v1/connectors/{id}/drain", "Drain a Connector (no new flows; existing ones stay)"
     " or, with drain=false, undo it", DrainResult, False, DrainRequest, True),
    ("post", "/api/v1/identities/{identity}/disconnect", "Close every connection of an identity",
     DisconnectResult, False, None, True),
]


def openapi(*, writes: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document; the write operations only when they are enabled."""
    models: list[type[BaseModel]] = [DashboardState, DrainRequest, DrainResult, DisconnectResult, ErrorBody]
    _, schema = models_json_schema([(m, "serialization") for m in models],
                                   ref_template="#/components/schemas/{model}")
    components = schema.get("$defs", {})
    paths: dict[str, Any] = {}
    for method, path, summary, model, many, body, write in ROUTES:
        if write and not writes:
            continue
        ref: dict[str, Any] = {"$ref": f"#/components/schemas/{model.__name__}"}
        content_type = "text/event-stream" if path.endswith("/events") else "application/json"
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": "OK", "content": {content_type: {
                    "schema": {"type": "array", "items": ref} if many else ref}}},
                "401": {"description": "missing or wrong token",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}},
            },
        }
        params = [{"name": p, "in": "path", "required": True,
                   "schema": {"type": "integer" if p == "id" else "string"}}
                  for p in ("id", "identity") if "{" + p + "}" in path]
        if params:
            op["parameters"] = params
        if body is not None:
            op["requestBody"] = {"required": False, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}
        if write:
            op["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "ztna Intermediate admin API", "version": API_VERSION},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
