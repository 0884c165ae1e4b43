"""End to end with real processes in a namespace: HTTP backend, `ztna intermediate`,
`ztna connector`, `ztna agent` (TUN + -L + SOCKS5); curl checked by sha256.

Then the Intermediate is killed and restarted: the same Agent process reconnects,
re-registers, and a new transfer succeeds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
from agent_util import PY, netns, nsexec, spawn, stop, wait_for

from ztna.agent.control import query
from ztna.certs import init_pki

pytestmark = [pytest.mark.root]  # ~16 s (stateless resets: everyone notices a restarted Intermediate at once)

SIZE = 4 * 1024 * 1024


def _connected(sock: Path, reconnects: int = 0) -> bool:
    try:
        snap = query(sock, timeout=0.5)
    except OSError:
        return False
    return (snap["intermediate"]["reconnects"] >= reconnects
            and snap["intermediate"]["state"] == "connected"
            and all(s["registration"] == "acked" and s["connector_up"] is not False for s in snap["services"]))


def _curl(ns: str, out: Path, *args: str) -> str:
    out.unlink(missing_ok=True)
    res = nsexec(ns, "curl", "-sS", "--max-time", "60", "-o", str(out), *args, timeout=90)
    assert res.returncode == 0, res.stderr
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_curl_through_tun_forward_socks_and_intermediate_restart(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["web"])
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(SIZE)
    (www / "blob").write_bytes(blob)
    want = hashlib.sha256(blob).hexdigest()
    ns = f"ztae{os.getpid() % 100000}"
    procs: list[subprocess.Popen[bytes]] = []
    state = tmp_path / "state"
    inter_cmd = (PY, "-m", "ztna", "intermediate", "--listen", "127.0.0.1:14433", "--pki", str(pki),
                 "--metrics", "off")
    with netns(ns):
        try:
            procs.append(spawn(ns, PY, "-m", "http.server", "-d", str(www), "-b", "127.0.0.1", "8080",
                               log=tmp_path / "http.log"))
            inter = spawn(ns, *inter_cmd, log=tmp_path / "inter.log")
            procs.append(inter)
            procs.append(spawn(ns, PY, "-m", "ztna", "connector", "--intermediate", "127.0.0.1:14433",
                               "--pki", str(pki), "--service", "web=10.100.0.2,fd00:100::2;tcp:80=127.0.0.1:8080",
                               "--p2p-port", "off", "--metrics", "off", log=tmp_path / "conn.log"))
            agent = spawn(ns, PY, "-m", "ztna", "agent", "--intermediate", "127.0.0.1:14433", "--pki", str(pki),
                          "--service", "web=10.100.0.2,fd00:100::2", "--mode", "tun", "--state-dir", str(state),
                          "-L", "127.0.0.1:18080=web:80", "--socks", "127.0.0.1:11080", log=tmp_path / "agent.log")
            procs.append(agent)
            sock = state / "ztna0.sock"
            wait_for(lambda: _connected(sock), 30, "agent connected")
            out = tmp_path / "out"
            wait_for(lambda: nsexec(ns, "curl", "-s", "-o", "/dev/null", "--max-time", "3",
                                    "http://10.100.0.2/blob").returncode == 0, 30, "connector serving")
            assert _curl(ns, out, "http://10.100.0.2/blob") == want
            assert _curl(ns, out, "http://[fd00:100::2]/blob") == want
            assert _curl(ns, out, "http://127.0.0.1:18080/blob") == want
            assert _curl(ns, out, "--socks5-hostname", "127.0.0.1:11080", "http://web.ztna/blob") == want

            inter.send_signal(signal.SIGKILL)
            inter.wait(10)
            procs.remove(inter)
            procs.append(spawn(ns, *inter_cmd, log=tmp_path / "inter2.log"))
            wait_for(lambda: _connected(sock, reconnects=1), 60, "agent reconnected")
            wait_for(lambda: nsexec(ns, "curl", "-s", "-o", "/dev/null", "--max-time", "3",
                                    "http://10.100.0.2/blob").returncode == 0, 60, "connector back")
            assert _curl(ns, out, "http://10.100.0.2/blob") == want
            assert agent.poll() is None
            stop(agent)
            assert agent.returncode == 0
            assert "ztna0" not in nsexec(ns, "ip", "link").stdout
        finally:
            for p in reversed(procs):
                stop(p)
