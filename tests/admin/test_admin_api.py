"""The admin API against real processes: an Intermediate with `--admin`, two Connectors of
one service, an Agent with a TCP forward. Every answer is checked against what really went
through (exact byte counts of a spliced flow, the identities of the certificates), the
write operations against their effect on real traffic (a drained Connector gets no new
flows while its open flow keeps echoing), and access control (401s counted)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from admin_world import PY, TcpEcho, World, echo_roundtrip, free_port, http, metrics, wait_for
from pydantic import TypeAdapter

from ztna.certs import init_pki
from ztna.intermediate.admin.models import ConnectionInfo, FlowInfo, Histograms, ServiceInfo

TOKEN = "s3cret-admin-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web"])
    return d


def test_non_loopback_admin_needs_a_token_file(pki: Path, tmp_path: Path) -> None:
    res = subprocess.run([PY, "-m", "ztna", "intermediate", "--pki", str(pki), "--listen", "127.0.0.1:0",
                          "--metrics", "off", "--admin", f"0.0.0.0:{free_port(socket.SOCK_STREAM)}"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2, res.stderr
    assert "needs admin_token_file (--admin-token-file)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    res = subprocess.run([PY, "-m", "ztna", "intermediate", "--pki", str(pki), "--listen", "127.0.0.1:0",
                          "--metrics", "off", "--admin", "127.0.0.1:0", "--admin-token-file", str(short)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "at least 16 characters" in res.stderr, res.stderr


def test_admin_api_end_to_end(pki: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    backend = TcpEcho()
    world = World(tmp=tmp_path, pki=pki)
    admin_port = free_port(socket.SOCK_STREAM)
    base = f"http://127.0.0.1:{admin_port}"
    fwd = free_port(socket.SOCK_STREAM)
    try:
        world.intermediate("--admin", f"127.0.0.1:{admin_port}", "--admin-token-file", str(token_file))
        svc = f"web=10.100.0.2;tcp:80=127.0.0.1:{backend.port}"
        world.connector("c1", [svc])
        world.connector("c2", [svc])
        world.agent("a1", fwd)

        def registered() -> list[ServiceInfo] | None:
            world.alive()
            status, body = http(f"{base}/api/v1/services")
            assert status == 200, body
            services = TypeAdapter(list[ServiceInfo]).validate_python(body)
            ok = len(services) == 1 and len(services[0].connectors) == 2 and len(services[0].agents) == 1
            return services if ok else None
        services = wait_for(registered, 40, "two connectors and the agent registered")
        web = services[0]
        assert web.service == "web"
        assert {c.identity for c in web.connectors} == {"connector"}
        assert all(c.healthy and not c.draining for c in web.connectors)
        assert web.agents[0].identity == "agent" and web.agents[0].path == "relay"
        wait_for(lambda: (world.status("a1") or {}).get("services", [{}])[0].get("connector_up"), 30,
                 "agent sees the service up")

        # One long-lived flow with exact byte counts.
        payload = os.urandom(100_000)
        held = socket.create_connection(("127.0.0.1", fwd), timeout=10)
        assert echo_roundtrip(fwd, payload, held) == payload
        status, body = http(f"{base}/api/v1/flows")
        flows = TypeAdapter(list[FlowInfo]).validate_python(body)
        live = [f for f in flows if f.state == "open"]
        assert len(live) == 1, flows
        flow = live[0]
        assert flow.service == "web" and flow.destination == "10.100.0.2:80"
        # Stream bytes: the Connector's side starts with its one status byte (docs/protocol.md).
        assert flow.bytes_up == len(payload) and flow.bytes_down == len(payload) + 1
        assert flow.connector in {c.id for c in web.connectors}

        # Connections: both roles, SANs from the certificates, real bytes and RTT.
        status, body = http(f"{base}/api/v1/connections")
        conns = TypeAdapter(list[ConnectionInfo]).validate_python(body)
        agent = next(c for c in conns if c.role == "agent")
        assert "DNS:agent.web.ztna" in agent.sans and agent.services == ["web"] and agent.path == "relay"
        assert agent.bytes_received > len(payload) and agent.bytes_sent > len(payload)
        assert agent.rtt_ms is not None and agent.rtt_ms >= 0
        assert sum(c.role == "connector" for c in conns) == 2

        status, body = http(f"{base}/api/v1/histograms")
        hist = Histograms.model_validate(body)
        assert hist.handshake.count >= 3 and sum(b.count for b in hist.handshake.buckets) == hist.handshake.count

        # The OpenAPI document lists every route, the write ones too (a token is configured).
        status, doc = http(f"{base}/api/v1/openapi.json")
        assert status == 200 and doc["openapi"].startswith("3.")
        for path in ("/api/v1/services", "/api/v1/connections", "/api/v1/flows", "/api/v1/histograms",
                     "/api/v1/events", "/api/v1/connectors/{id}/drain", "/api/v1/identities/{identity}/disconnect"):
            assert path in doc["paths"], path
        assert "ServiceInfo" in doc["components"]["schemas"]

        # Access control: writes need the token, even on loopback; wrong ones are counted.
        drained = flow.connector
        other = next(c.id for c in web.connectors if c.id != drained)
        url = f"{base}/api/v1/connectors/{drained}/drain"
        assert http(url, method="POST")[0] == 401
        assert http(url, method="POST", token="wrong-token-wrong-token")[0] == 401
        assert http(f"{base}/api/v1/connectors/999999/drain", method="POST", token=TOKEN)[0] == 404
        status, body = http(url, method="POST", token=TOKEN, body={"drain": True})
        assert status == 200 and body == {"id": drained, "draining": True}
        m = metrics(world.ports["intermediate_metrics"])
        assert m["ztna_admin_unauthorized_total"] == 2
        assert m['ztna_admin_requests_total{route="/api/v1/connectors/{id}/drain",status="401"}'] == 2
        assert m['ztna_admin_requests_total{route="/api/v1/services",status="200"}'] >= 1

        # Drained: every new flow goes to the other Connector; the open one stays and works.
        for _ in range(6):
            data = os.urandom(20_000)
            assert echo_roundtrip(fwd, data) == data
        again = os.urandom(50_000)
        assert echo_roundtrip(fwd, again, held) == again
        flows = TypeAdapter(list[FlowInfo]).validate_python(http(f"{base}/api/v1/flows")[1])
        new = [f for f in flows if f.state == "closed"]
        assert len(new) == 6 and all(f.connector == other for f in new), flows
        assert all(f.bytes_up == 20_000 and f.bytes_down == 20_001 for f in new)
        still = [f for f in flows if f.state == "open"]
        assert len(still) == 1 and still[0].connector == drained
        assert still[0].bytes_up == len(payload) + len(again)
        services = TypeAdapter(list[ServiceInfo]).validate_python(http(f"{base}/api/v1/services")[1])
        assert {c.id: c.draining for c in services[0].connectors} == {drained: True, other: False}
        assert {c.id: c.flows for c in services[0].connectors} == {drained: 1, other: 0}
        held.close()

        # Disconnect an identity: the Agent's connection is closed with that reason.
        status, body = http(f"{base}/api/v1/identities/agent/disconnect", method="POST", token=TOKEN)
        assert status == 200 and body["identity"] == "agent" and body["closed"] >= 1
        wait_for(lambda: "disconnected by the administrator" in world.log("intermediate"), 10, "close logged")
        # The Agent is not revoked: it comes back, and the service works again.
        wait_for(lambda: echo_roundtrip(fwd, b"back") == b"back", 40, "agent reconnected")
        world.alive()
    finally:
        world.stop()
        backend.close()


def test_reads_off_loopback_need_the_token(pki: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN)
    world = World(tmp=tmp_path, pki=pki)
    admin_port = free_port(socket.SOCK_STREAM)
    try:
        world.intermediate("--admin", f"0.0.0.0:{admin_port}", "--admin-token-file", str(token_file))
        base = f"http://127.0.0.1:{admin_port}"
        assert http(f"{base}/api/v1/services")[0] == 401
        assert http(f"{base}/api/v1/services", token=TOKEN + "x")[0] == 401
        assert http(f"{base}/api/v1/services", token=TOKEN) == (200, [])
        status, page = http(f"{base}/")
        assert status == 200 and "ztna Intermediate" in page   # the page itself holds no data
        assert metrics(world.ports["intermediate_metrics"])["ztna_admin_unauthorized_total"] == 2
    finally:
        world.stop()


def test_event_stream_is_live_and_does_not_hold_up_a_stop(pki: Path, tmp_path: Path) -> None:
    import json
    import signal
    import urllib.request

    world = World(tmp=tmp_path, pki=pki)
    admin_port = free_port(socket.SOCK_STREAM)
    try:
        world.intermediate("--admin", f"127.0.0.1:{admin_port}")
        stream = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/api/v1/events", timeout=10)
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        events = []
        while len(events) < 2:
            line = stream.readline().decode()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
        # One state per second, each a fresh snapshot.
        assert events[0]["taken_at"] < events[1]["taken_at"]
        assert events[0]["services"] == [] and events[0]["histograms"]["handshake"]["count"] == 0
        proc = world.procs["intermediate"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0     # an open event stream does not hold the stop up
        stream.close()
    finally:
        world.stop()
