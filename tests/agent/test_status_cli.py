"""`ztna status` and `ztna status --json` run through a pipe against real processes on
loopback (`ztna intermediate`, `ztna connector` with UDP and TCP echo backends, a userspace
`ztna agent` with a `-U` and a `-L` forward), on the relay and on the direct path.

Checked: known byte counts through DATAGRAMs (UDP) and QUIC streams (TCP) are counted
exactly once per service; the connector column names who serves the service; last_error
is null on a healthy link; retry_at is wall-clock ISO 8601; the table is not cut at 80
columns in a pipe; with no Agent (or only a dead one's socket) status says so in one line
and exits non-zero."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from agent_util import PY, wait_for  # noqa: E402
from loopback_procs import TcpEcho, UdpEcho, World, free_port, loopback_world  # noqa: E402

from ztna.certs import init_pki

UDP_SIZES = (1, 200, 1000, 1200)
TCP_BYTES = 300_000


def _traffic(w: World, uport: int, lport: int) -> tuple[int, int]:
    """Send known UDP datagrams and a known TCP byte count, check the echoes; returns
    (IP bytes carried in DATAGRAMs one way, TCP payload bytes one way)."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect(("127.0.0.1", uport))
    u.settimeout(3)
    ip_bytes = 0
    for size in UDP_SIZES:
        payload = os.urandom(size)
        u.send(payload)
        assert u.recv(65535) == payload, size
        ip_bytes += 20 + 8 + size
    u.close()
    blob = os.urandom(TCP_BYTES)
    t = socket.create_connection(("127.0.0.1", lport), timeout=10)
    t.sendall(blob)
    t.shutdown(socket.SHUT_WR)
    got = bytearray()
    while chunk := t.recv(65536):
        got += chunk
    t.close()
    assert bytes(got) == blob
    return ip_bytes, TCP_BYTES


def _check_counters(w: World, ip_bytes: int, tcp_bytes: int) -> dict:  # type: ignore[type-arg]
    # The TCP splice counts when the last bytes are written locally; wait for the stream to end.
    wait_for(lambda: w.snap()["userspace"]["tcp_active"] == 0, 10, "stream finished")
    web = w.service()
    assert web["tx_packets"] == len(UDP_SIZES) and web["rx_packets"] == len(UDP_SIZES), web
    assert web["stream_tx_bytes"] == tcp_bytes and web["stream_rx_bytes"] == tcp_bytes, web
    assert web["tx_bytes"] == ip_bytes + tcp_bytes, web
    assert web["rx_bytes"] == ip_bytes + tcp_bytes, web
    assert web["streams"] == 1
    return web


def _table_checks(w: World, want_connector: str) -> str:
    res = w.status()          # stdout is a pipe; COLUMNS=80 in its environment
    out = res.stdout
    assert "\x1b[" not in out, "colour codes in a pipe"
    assert "…" not in out, out
    row = next(line for line in out.splitlines() if "10.100.0.2" in line)
    assert len(row) > 80, row             # the whole row, not cut to the 80 columns
    assert want_connector in row, row
    web = w.service()
    assert f"{web['tx_packets']} pkts" in row and f"{web['rx_packets']} pkts" in row, row
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web"])
    return d


@pytest.mark.parametrize("path", ["relay", "direct"])
def test_status_counts_connector_and_pipe_output(pki: Path, tmp_path: Path, path: str) -> None:
    udp, tcp = UdpEcho(), TcpEcho()
    uport, lport = free_port(), free_port(socket.SOCK_STREAM)
    try:
        with loopback_world(tmp_path, pki, p2p=path == "direct",
                            connector_services=[f"web=10.100.0.2,fd00:100::2;udp:53=127.0.0.1:{udp.port};"
                                                f"tcp:80=127.0.0.1:{tcp.port}"],
                            agent_args=["-U", f"127.0.0.1:{uport}=web:53", "-L", f"127.0.0.1:{lport}=web:80"]) as w:
            if path == "direct":
                wait_for(lambda: w.service()["path"] == "direct", 30, "direct path")
            ip_bytes, tcp_bytes = _traffic(w, uport, lport)
            web = _check_counters(w, ip_bytes, tcp_bytes)

            snap = w.snap()
            inter = snap["intermediate"]
            assert inter["state"] == "connected" and inter["handshake"] == "full"
            assert inter["last_error"] is None and inter["last_error_at"] is None, inter
            assert web["connector_up"] is True
            # The Intermediate names the Connector (certificate CN and connection number).
            assert re.fullmatch(r"connector#\d+", web["connector"] or ""), web
            p2p = snap["p2p"]["services"]["web"]
            if path == "direct":
                # The peer's TLS name and whichever of its candidate addresses won the punch.
                assert re.fullmatch(r"connector\.web\.ztna at \S+:\d+", web["direct_peer"] or ""), web
                want = web["direct_peer"]
                assert snap["userspace"]["tcp_direct"] == 1
            else:
                assert web["direct_peer"] is None
                want = f"up: {web['connector']}"
                # No P2P server at the Connector: the punch fails and a retry is scheduled,
                # reported on the wall clock (and as seconds from now), not as monotonic time.
                wait_for(lambda: w.snap()["p2p"]["services"]["web"]["retry_at"] is not None, 20, "punch retry")
                p2p = w.snap()["p2p"]["services"]["web"]
                at = datetime.datetime.fromisoformat(p2p["retry_at"])
                now = datetime.datetime.now(datetime.UTC)
                assert at.tzinfo is not None
                assert now - datetime.timedelta(seconds=5) <= at <= now + datetime.timedelta(seconds=700), p2p
                assert 0 <= p2p["retry_in_s"] <= 700
            if p2p.get("retry_at") is not None:
                datetime.datetime.fromisoformat(p2p["retry_at"])
            _table_checks(w, want)

            # A killed Agent leaves its socket behind: still "agent not running", one line.
            agent = w.procs["agent"]
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            assert (w.state / "t.sock").exists()
            res = w.status(check=False)
            assert res.returncode != 0
            assert res.stdout == ""
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "agent not running" in lines[0] and "--state-dir" in lines[0], res.stderr
            assert "Errno" not in res.stderr
    finally:
        udp.close()
        tcp.close()


def test_status_without_agent(tmp_path: Path) -> None:
    for extra in ([], ["--json"], ["--name", "nosuch"]):
        res = subprocess.run([PY, "-m", "ztna", "status", "--state-dir", str(tmp_path / "none"), *extra],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "agent not running" in lines[0] and "--state-dir" in lines[0], res.stderr
        assert "Errno" not in res.stderr and not res.stdout
    # JSON through a pipe stays valid JSON when an Agent runs: covered above; here the error
    # must not masquerade as JSON.
    with pytest.raises(json.JSONDecodeError):
        json.loads(res.stdout)
