"""The admin API's pure parts: Snapshot -> JSON models, histograms, the OpenAPI document,
and the registry's drain (new flows avoid a drained Connector, pinned ones stay)."""

from __future__ import annotations

from ztna.intermediate.admin import models
from ztna.intermediate.admin.snapshot import (
    BUCKETS_MS,
    ConnectionView,
    FlowView,
    LatencyHistogram,
    Snapshot,
)
from ztna.intermediate.registry import AllowAll, Registry
from ztna.wire.registration import Register, Role


def _conn(peer: int, cn: str, *, agent: tuple[str, ...] = (), connector: tuple[str, ...] = (),
          health: dict[str, bool] | None = None, paths: dict[str, str] | None = None) -> ConnectionView:
    return ConnectionView(peer_id=peer, identity=cn, sans=(f"DNS:{cn}.web.ztna",), agent_services=agent,
                          connector_services=connector, address="127.0.0.1:1", rtt_ms=1.5, bytes_sent=10,
                          bytes_received=20, connected_at=1_700_000_000.0, health=health or {},
                          draining=False, paths=paths or {}, warmup_ms={"web": 42.0} if paths else {})


def test_snapshot_to_services_connections_and_flows() -> None:
    hist = LatencyHistogram()
    for s in (0.0005, 0.003, 0.003, 7.0):
        hist.observe(s)
    snap = Snapshot(
        taken_at=1_700_000_010.0, pools={"web": (2, 3)}, agents={"web": (1,)},
        connections={1: _conn(1, "agent", agent=("web",), paths={"web": "direct"}),
                     2: _conn(2, "connector", connector=("web",), health={"web": False}),
                     3: _conn(3, "connector", connector=("web",))},
        flows=(FlowView(1, 3, "web", "10.0.0.1:80", 5, 6, 1_700_000_001.0, None),
               FlowView(1, 2, "web", "10.0.0.1:80", 7, 8, 1_700_000_000.0, 1_700_000_002.0)),
        handshake=hist.frozen(), warmup=LatencyHistogram().frozen(), relayed_bytes=99)
    (web,) = models.services(snap)
    assert [(c.id, c.healthy, c.flows) for c in web.connectors] == [(2, False, 0), (3, True, 1)]
    assert [(a.id, a.path, a.warmup_ms) for a in web.agents] == [(1, "direct", 42.0)]
    conns = models.connections(snap)
    assert [c.role for c in conns] == ["agent", "connector", "connector"]
    assert conns[0].path == "direct" and conns[1].path is None
    flows = models.flows(snap)
    assert [f.state for f in flows] == ["open", "closed"]
    h = models.histogram(snap.handshake)
    assert h.count == 4 and [b.count for b in h.buckets if b.count] == [1, 2, 1]
    assert h.buckets[-1].le_ms is None and h.buckets[-1].count == 1   # 7 s: overflow
    assert h.p50_ms == 5.0 and h.p95_ms is None
    assert len(h.buckets) == len(BUCKETS_MS) + 1
    state = models.dashboard(snap)
    assert models.DashboardState.model_validate_json(state.model_dump_json()) == state


def test_openapi_document_has_writes_only_when_enabled() -> None:
    with_writes = models.openapi(writes=True)
    without = models.openapi(writes=False)
    assert "/api/v1/connectors/{id}/drain" in with_writes["paths"]
    assert "/api/v1/connectors/{id}/drain" not in without["paths"]
    schemas = with_writes["components"]["schemas"]
    for name in ("ServiceInfo", "ConnectorInfo", "ConnectionInfo", "FlowInfo", "Histograms", "DashboardState"):
        assert name in schemas, name
    assert set(schemas["ConnectorInfo"]["properties"]) >= {"id", "identity", "healthy", "address", "flows"}
    # Every reference resolves.
    import json

    for ref in json.dumps(with_writes).split('"$ref": "')[1:]:
        assert ref.split('"', 1)[0].removeprefix("#/components/schemas/") in schemas


def test_drained_connector_gets_no_new_flows_but_keeps_its_own() -> None:
    reg = Registry()
    for peer in (1, 2, 3):
        reg.add_peer(peer, AllowAll())
    reg.register(1, Register(role=Role.AGENT, service_id="web"))
    reg.register(2, Register(role=Role.CONNECTOR, service_id="web"))
    reg.register(3, Register(role=Role.CONNECTOR, service_id="web"))
    packets = [bytes([0x45]) + bytes(8) + bytes([17]) + bytes(2) + bytes([10, 0, 0, i]) + bytes([10, 0, 0, 2])
               + i.to_bytes(2, "big") + b"\x00\x35" for i in range(1, 60)]
    first = {p: reg.connector_for("web", p, now=0.0) for p in packets}
    assert set(first.values()) == {2, 3}
    assert reg.set_draining(2, True) and not reg.set_draining(1, True) and not reg.set_draining(9, True)
    # Existing flows stay where they are; new ones avoid the drained Connector.
    assert all(reg.connector_for("web", p, now=1.0) == c for p, c in first.items())
    fresh = [p[:-4] + b"\x77\x77\x00\x35" for p in packets]
    assert {reg.connector_for("web", p, now=1.0) for p in fresh} == {3}
    # Alone in its pool, a drained Connector still serves (drain is not an outage).
    reg.remove_peer(3)
    assert reg.connector_for("web", fresh[0], now=2.0) == 2
    reg.set_draining(2, False)
    assert 2 not in reg.draining
