"""A Connector killed with SIGKILL and started again serves new connections at once.

Real processes in a namespace: HTTP and UDP echo backends, `ztna intermediate`,
`ztna connector`, a TUN `ztna agent` (TCP over streams through the nftables redirect).
The Connector is SIGKILLed — no goodbye, so its old QUIC connection lingers at the
Intermediate — and started again. The new process (same certificate, same name) must
replace its stale registration: within 3 s of the new registration, 8 new TCP connections
(body sha256) and 16 new UDP flows (echo) all succeed. Without the replacement the dead
registration stays in the service's pool until the idle timeout and about half of the new
flows are steered to it. A Connector with another certificate joins the pool instead of
taking it over.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from agent_util import HERE, PY, netns, nsexec, spawn, stop, wait_for

from ztna.agent.control import query
from ztna.certs import init_pki, issue

pytestmark = [pytest.mark.root]

PROBE = str(HERE / "flow_probe.py")
REGISTERED = "service 'web' registered with the intermediate"


def _ready(sock: Path) -> bool:
    try:
        snap = query(sock, timeout=0.5)
    except OSError:
        return False
    return snap["intermediate"]["state"] == "connected" and all(
        s["registration"] == "acked" and s["connector_up"] is not False for s in snap["services"])


def _probe(ns: str, *args: str) -> dict:
    res = nsexec(ns, PY, PROBE, *args, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_connector_sigkill_restart_serves_new_flows_within_3s(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["web"])
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(512 * 1024)
    (www / "blob").write_bytes(blob)
    want = hashlib.sha256(blob).hexdigest()
    ns = f"ztcr{os.getpid() % 100000}"
    state = tmp_path / "state"
    conn_cmd = (PY, "-m", "ztna", "connector", "--intermediate", "127.0.0.1:14633", "--pki", str(pki),
                "--service", "web=10.100.0.2;tcp:80=127.0.0.1:8080;udp:7=127.0.0.1:7007",
                "--p2p-port", "off", "--metrics", "off")
    procs: list[subprocess.Popen[bytes]] = []
    with netns(ns):
        try:
            procs.append(spawn(ns, PY, "-m", "http.server", "-d", str(www), "-b", "127.0.0.1", "8080",
                               log=tmp_path / "http.log"))
            procs.append(spawn(ns, PY, PROBE, "udp-echo", "7007", log=tmp_path / "echo.log"))
            procs.append(spawn(ns, PY, "-m", "ztna", "intermediate", "--listen", "127.0.0.1:14633",
                               "--pki", str(pki), "--metrics", "off", log=tmp_path / "inter.log"))
            conn = spawn(ns, *conn_cmd, log=tmp_path / "conn.log")
            agent = spawn(ns, PY, "-m", "ztna", "agent", "--intermediate", "127.0.0.1:14633", "--pki", str(pki),
                          "--service", "web=10.100.0.2", "--mode", "tun", "--state-dir", str(state),
                          log=tmp_path / "agent.log")
            procs.append(agent)
            wait_for(lambda: _ready(state / "ztna0.sock"), 30, "agent connected")
            wait_for(lambda: REGISTERED in _text(tmp_path / "conn.log"), 30, "connector registered")
            first = _probe(ns, "http", "10.100.0.2", "80", "/blob", "4", want)
            assert first["ok"] == 4, first
            assert _probe(ns, "udp", "10.100.0.2", "7", "4", "2")["ok"] == 4

            conn.send_signal(signal.SIGKILL)
            conn.wait(10)
            restarted = time.monotonic()
            conn = spawn(ns, *conn_cmd, log=tmp_path / "conn2.log")
            wait_for(lambda: REGISTERED in _text(tmp_path / "conn2.log"), 15, "restarted connector registered")
            registered = time.monotonic()
            tcp = _probe(ns, "http", "10.100.0.2", "80", "/blob", "8", want)
            udp = _probe(ns, "udp", "10.100.0.2", "7", "16", "2.5")
            done = time.monotonic()
            print(f"restart -> registered {registered - restarted:.2f} s; registered -> 8 TCP + 16 UDP flows "
                  f"served {done - registered:.2f} s (tcp {tcp['seconds']} s, udp {udp['seconds']} s)")
            assert tcp["ok"] == 8, tcp
            assert udp["ok"] == 16, udp
            assert done - registered < 3.0, (done - registered, tcp, udp)
            assert "superseded by a new connection" in _text(tmp_path / "inter.log")

            # Another certificate (another Connector, also allowed for `web`) joins the pool: it
            # must not replace the running Connector, whose flows keep being served.
            issue(pki, "connector", "connector-b", ["web"])
            other = spawn(ns, PY, "-m", "ztna", "connector", "--intermediate", "127.0.0.1:14633",
                          "--cert", str(pki / "connector-b.pem"), "--key", str(pki / "connector-b.key"),
                          "--ca", str(pki / "ca.pem"), "--name", conn_name(tmp_path),
                          "--service", "web=10.100.0.2;tcp:80=127.0.0.1:8080;udp:7=127.0.0.1:7007",
                          "--p2p-port", "off", "--metrics", "off", log=tmp_path / "conn-b.log")
            procs.append(other)
            wait_for(lambda: REGISTERED in _text(tmp_path / "conn-b.log"), 15, "second connector registered")
            assert _text(tmp_path / "inter.log").count("superseded by a new connection") == 1
            assert conn.poll() is None and "superseded" not in _text(tmp_path / "conn2.log")
            assert _probe(ns, "http", "10.100.0.2", "80", "/blob", "8", want)["ok"] == 8
            assert _probe(ns, "udp", "10.100.0.2", "7", "16", "2.5")["ok"] == 16
            refused = [ln for ln in _text(tmp_path / "agent.log").splitlines() if "refused:" in ln]
            assert all(not ln.rstrip().endswith("refused:") for ln in refused), refused
        finally:
            procs.append(conn)
            for p in reversed(procs):
                stop(p)


def conn_name(tmp_path: Path) -> str:
    """The first Connector's name (its default, the host name): the other certificate even
    uses the same name, and still only joins."""
    import socket

    return socket.gethostname()
