"""Per-flow audit logs after real flows between real processes on loopback.

`ztna intermediate --audit-log`, `ztna connector --audit-log` (TCP and UDP echo backends)
and a userspace `ztna agent` with a TCP (`-L`, TCP over QUIC streams) and a UDP (`-U`)
forward. We move a known number of bytes each way, then read the JSON lines back through
the pydantic model and check what each process says about each flow: who (the Agent
certificate's SANs, its agent id), what (service, protocol, port), which path, setup times,
bytes each way, duration and close reason; and the interim line of a flow that lives longer
than `--audit-interval`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from agent_util import stop, wait_for
from loopback_procs import TcpEcho, UdpEcho, free_port, loopback_world

from ztna.audit import FlowRecord
from ztna.certs import init_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web"])
    return d


def _records(path: Path) -> list[FlowRecord]:
    if not path.exists():
        return []
    return [FlowRecord.model_validate(json.loads(line)) for line in path.read_text().splitlines() if line]


def _tcp_roundtrip(port: int, payload: bytes, hold: float = 0.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload[: len(payload) // 2])
        time.sleep(hold)
        s.sendall(payload[len(payload) // 2:])
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
    return bytes(got)


@pytest.mark.parametrize("path", ["relay", "direct"])
def test_audit_lines_after_tcp_and_udp_flows(pki: Path, tmp_path: Path, path: str) -> None:
    udp, tcp = UdpEcho(), TcpEcho()
    uport, lport = free_port(), free_port(socket.SOCK_STREAM)
    inter_log, conn_log = tmp_path / "audit-intermediate.jsonl", tmp_path / "audit-connector.jsonl"
    try:
        with loopback_world(tmp_path, pki, p2p=path == "direct",
                            connector_services=[f"web=10.100.0.2;udp:53=127.0.0.1:{udp.port};"
                                                f"tcp:80=127.0.0.1:{tcp.port}"],
                            agent_args=["-U", f"127.0.0.1:{uport}=web:53", "-L", f"127.0.0.1:{lport}=web:80"],
                            intermediate_args=("--audit-log", str(inter_log), "--audit-interval", "0.05"),
                            connector_args=("--audit-log", str(conn_log), "--audit-interval", "0.05")) as w:
            if path == "direct":
                wait_for(lambda: w.service()["path"] == "direct", 30, "direct path")
            agent_id = None
            # TCP: 300 kB up, echoed back; held open across one interim period (3 s).
            payload = os.urandom(300_000)
            assert _tcp_roundtrip(lport, payload, hold=4.0) == payload
            # UDP: 5 datagrams of 700 bytes, echoed.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                for i in range(5):
                    msg = bytes([i]) * 700
                    s.sendto(msg, ("127.0.0.1", uport))
                    assert s.recvfrom(2048)[0] == msg

            def tcp_ended(file: Path) -> bool:
                return any(r.event == "end" and r.protocol == "tcp" for r in _records(file))
            wait_for(lambda: tcp_ended(conn_log), 15, "connector's TCP end line")
            if path == "relay":
                wait_for(lambda: tcp_ended(inter_log), 15, "intermediate's TCP end line")
            # The Connector ends its UDP flows (and writes their lines) when it stops.
            stop(w.procs["connector"])

        recs = _records(conn_log)
        tcp_end = [r for r in recs if r.event == "end" and r.protocol == "tcp"]
        assert len(tcp_end) == 1, recs
        t = tcp_end[0]
        assert (t.process, t.service, t.dst_port, t.path) == ("connector", "web", 80, path)
        assert t.bytes_to_service == t.bytes_from_service == len(payload)
        assert t.close_reason == "closed", t
        # Held open 4 s after the first bytes; the flow starts when its stream header
        # arrives, which a loaded machine may delay a little.
        assert t.duration_s >= 3.0, t
        assert t.setup.backend_connect_ms is not None and t.setup.backend_connect_ms >= 0
        assert t.agent_id is not None
        agent_id = t.agent_id
        interim = [r for r in recs if r.event == "interim" and r.protocol == "tcp"]
        assert interim and interim[0].flow == t.flow and interim[0].close_reason is None
        assert 0 < interim[0].bytes_to_service <= len(payload)
        udp_end = [r for r in recs if r.event == "end" and r.protocol == "udp"]
        assert len(udp_end) == 1, recs
        u = udp_end[0]
        assert (u.service, u.dst_port, u.path, u.agent_id) == ("web", 53, path, agent_id)
        assert u.bytes_to_service == u.bytes_from_service == 5 * 700
        assert u.close_reason == "shutdown"
        if path == "direct":
            # The direct connection is the Connector's own: it knows who and how it was set up.
            for r in (t, u):
                assert r.identity == ["agent.web.ztna"], r
                assert r.setup.handshake_ms is not None and r.setup.registration_ms is not None
                assert r.setup.punch_ms is not None and r.setup.punch_ms > 0
            assert not _records(inter_log), "a direct flow never reaches the Intermediate"
        else:
            assert t.identity is None and t.setup.handshake_ms is None   # the Intermediate's to know
            irecs = [r for r in _records(inter_log) if r.event == "end"]
            assert len(irecs) == 1, irecs
            i = irecs[0]
            assert (i.process, i.service, i.protocol, i.dst_port, i.path) == ("intermediate", "web", "tcp", 80, "relay")
            assert i.identity == ["agent.web.ztna"] and i.agent_id == agent_id
            assert i.connector is not None and i.connector.startswith("connector#")
            assert i.bytes_to_service == i.bytes_from_service == len(payload)
            assert i.close_reason == "closed"
            assert i.setup.handshake_ms is not None and i.setup.handshake_ms > 0
            assert i.setup.registration_ms is not None and i.setup.backend_connect_ms is not None
            assert i.setup.punch_ms is None
            assert any(r.event == "interim" for r in _records(inter_log))
    finally:
        udp.close()
        tcp.close()


def test_audit_log_rotates_by_size(tmp_path: Path) -> None:
    """RotatingFileHandler behind the queue: the file never grows past the limit."""
    import asyncio

    from ztna.audit import AuditLog, FlowAudit

    async def main() -> None:
        log = AuditLog(tmp_path / "a.jsonl", process="connector", max_bytes=4096, backups=2)
        for i in range(200):
            flow = FlowAudit(f"c{i}", service="web", protocol="udp", path="relay", now=0.0, dst_port=53)
            flow.to_service = i
            log.end(flow, "closed", now=1.0)
        log.close()
    asyncio.run(main())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.jsonl", "a.jsonl.1", "a.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)
    last = _records(tmp_path / "a.jsonl")[-1]
    assert last.flow == "c199" and last.bytes_to_service == 199 and last.duration_s == 1.0
