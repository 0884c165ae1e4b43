"""TUN mode in a network namespace: real Intermediate, fake echoing Connector, real Agent.

Checks the split-tunnel routes, UDP and ICMP round trips over IPv4 and IPv6 virtual IPs
through the kernel, the status socket, and the crash cleanup (SIGKILL, then restart).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from agent_util import HERE, PY, netns, nsexec, spawn, stop, wait_for

from ztna.agent.control import query
from ztna.certs import init_pki

pytestmark = pytest.mark.root

UDP_ECHO = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(5)
payload = bytes(range(256)) * 4
s.sendto(payload, (sys.argv[1], 9999))
data, addr = s.recvfrom(65535)
assert data == payload, (len(data), data[:16])
print('ok', addr[0], addr[1])
"""


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_pki(tmp_path / "pki", ["web"])
    return tmp_path / "pki"


def _agent(ns: str, pki: Path, port: str, state: Path, log: Path) -> subprocess.Popen[bytes]:
    return spawn(ns, PY, "-m", "ztna", "agent", "--intermediate", f"127.0.0.1:{port}", "--pki", str(pki),
                 "--service", "web=10.100.0.2,fd00:100::2", "--mode", "tun", "--tun-name", "ztt0",
                 "--state-dir", str(state), "--log-level", "debug", log=log)


def _ready(sock: Path) -> bool:
    try:
        snap = query(sock, timeout=0.5)
    except OSError:
        return False
    return all(s["registration"] == "acked" for s in snap["services"])


def test_tun_udp_icmp_v4_v6_and_crash_cleanup(tmp_path: Path, pki: Path) -> None:
    ns = f"ztag{os.getpid() % 100000}"
    state = tmp_path / "state"
    with netns(ns):
        peer = spawn(ns, PY, str(HERE / "fake_connector.py"), str(pki), str(tmp_path / "port"), "web",
                     log=tmp_path / "peer.log")
        agent = None
        try:
            wait_for(lambda: (tmp_path / "port").exists(), what="intermediate")
            port = (tmp_path / "port").read_text()
            agent = _agent(ns, pki, port, state, tmp_path / "agent.log")
            sock = state / "ztt0.sock"
            wait_for(lambda: _ready(sock), what="agent registered")

            routes4 = nsexec(ns, "ip", "-4", "route", "show", "dev", "ztt0").stdout
            routes6 = nsexec(ns, "ip", "-6", "route", "show", "dev", "ztt0").stdout
            assert routes4.split()[0] == "10.100.0.2"
            assert "fd00:100::2" in routes6
            assert "default" not in routes4 + routes6   # split tunnel only

            for dst in ("10.100.0.2", "fd00:100::2"):
                out = nsexec(ns, PY, "-c", UDP_ECHO, dst, timeout=20)
                assert out.returncode == 0, out.stderr
                assert out.stdout.split()[:2] == ["ok", dst]
            ping = nsexec(ns, "ping", "-c", "2", "-W", "3", "10.100.0.2")
            assert ping.returncode == 0, ping.stdout + ping.stderr
            ping6 = nsexec(ns, "ping", "-6", "-c", "2", "-W", "3", "fd00:100::2")
            assert ping6.returncode == 0, ping6.stdout + ping6.stderr

            snap = query(sock)
            web = snap["services"][0]
            assert web["tx_packets"] >= 6 and web["rx_packets"] >= 6
            assert web["rx_bytes"] > 2048
            # The native pump moved them both ways (Python saw neither the packets nor the
            # DATAGRAMs), and the status counts include what it moved.
            native = snap["tun"]["native"]
            assert native["read_packets"] - native["to_python"] >= 6, native
            assert native["written"] >= 6, native
            assert native["panics"] == 0
            assert snap["tun"]["mtu"] == snap["intermediate"]["max_datagram_payload"] - 7 - 3
            assert snap["intermediate"]["state"] == "connected"
            status = subprocess.run([PY, "-m", "ztna", "status", "--state-dir", str(state), "--json"],
                                    capture_output=True, text=True)
            assert json.loads(status.stdout)["services"][0]["id"] == "web"

            # SIGKILL: the state file stays behind; the next start cleans up and works.
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            assert (state / "ztt0.json").exists()
            agent = _agent(ns, pki, port, state, tmp_path / "agent2.log")
            wait_for(lambda: _ready(sock), what="agent registered again")
            out = nsexec(ns, PY, "-c", UDP_ECHO, "10.100.0.2", timeout=20)
            assert out.returncode == 0, out.stderr
            stop(agent)
            assert agent.returncode == 0, (tmp_path / "agent2.log").read_text()[-2000:]
            agent = None
            assert "ztt0" not in nsexec(ns, "ip", "link").stdout
            assert "10.100.0.2" not in nsexec(ns, "ip", "route").stdout
            assert not (state / "ztt0.json").exists()
            assert not sock.exists()
        finally:
            if agent is not None:
                stop(agent)
            stop(peer)


def test_recover_stale_removes_leftover_device_and_routes(tmp_path: Path) -> None:
    """A persistent device + routes and a state file from a dead pid are removed."""
    ns = f"ztrs{os.getpid() % 100000}"
    with netns(ns):
        script = f"""
import json, pathlib, subprocess
from ztna.agent.tun import TunDevice
subprocess.run(['ip', 'tuntap', 'add', 'mode', 'tun', 'name', 'zts0'], check=True)
subprocess.run(['ip', 'link', 'set', 'zts0', 'up'], check=True)
subprocess.run(['ip', 'route', 'add', '10.100.0.9/32', 'dev', 'zts0'], check=True)
p = pathlib.Path({str(tmp_path / 'zts0.json')!r})
p.write_text(json.dumps({{'pid': 999999999, 'tun': 'zts0', 'routes': ['10.100.0.9']}}))
print(TunDevice.recover_stale(p), p.exists())
"""
        out = nsexec(ns, PY, "-c", script)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", "False"]
        assert "zts0" not in nsexec(ns, "ip", "link").stdout
        assert "10.100.0.9" not in nsexec(ns, "ip", "route").stdout
