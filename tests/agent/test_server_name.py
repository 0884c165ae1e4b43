"""The Intermediate's TLS name defaults to the host the programs were given, IP or DNS name.

Real processes in a private namespace (so the default port 4433 is ours): certificates
issued with `ztna certs init --host 127.0.0.1` only, an Intermediate on 127.0.0.1:4433, a
Connector given `--intermediate 127.0.0.1` (no port), a userspace Agent given
`--intermediate 127.0.0.1:4433` and no `--server-name`. A download through the Agent's -L
forward is checked by sha256. An Agent pointed at a name the certificate does not hold
logs one ERROR line naming the expected name and the certificate's names.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from agent_util import PY, netns, nsexec, spawn, stop, wait_for

from ztna.certs import init_pki

pytestmark = [pytest.mark.root]


def _start_world(tmp_path: Path, ns: str, hosts: list[str]) -> tuple[list[subprocess.Popen[bytes]], bytes]:
    pki = tmp_path / "pki"
    init_pki(pki, ["web"], hosts=hosts)
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(2 * 1024 * 1024)
    (www / "blob").write_bytes(blob)
    procs = [
        spawn(ns, PY, "-m", "http.server", "-d", str(www), "-b", "127.0.0.1", "8080", log=tmp_path / "http.log"),
        spawn(ns, PY, "-m", "ztna", "intermediate", "--listen", "127.0.0.1:4433", "--pki", str(pki),
              "--metrics", "off", log=tmp_path / "inter.log"),
        spawn(ns, PY, "-m", "ztna", "connector", "--intermediate", "127.0.0.1", "--pki", str(pki),
              "--service", "web=10.100.0.2;tcp:80=127.0.0.1:8080", "--p2p-port", "off", "--metrics", "off",
              log=tmp_path / "conn.log"),
    ]
    return procs, blob


def _agent(ns: str, tmp_path: Path, target: str, name: str, port: int) -> subprocess.Popen[bytes]:
    return spawn(ns, PY, "-m", "ztna", "agent", "--intermediate", target, "--pki", str(tmp_path / "pki"),
                 "--service", "web=10.100.0.2", "--mode", "userspace", "--name", name,
                 "--state-dir", str(tmp_path / "state"), "-L", f"127.0.0.1:{port}=web:80",
                 log=tmp_path / f"{name}.log")


def test_agent_and_connector_verify_the_intermediate_by_ip(tmp_path: Path) -> None:
    ns = f"ztsn{os.getpid() % 100000}"
    with netns(ns):
        procs, blob = _start_world(tmp_path, ns, ["127.0.0.1"])
        try:
            procs.append(_agent(ns, tmp_path, "127.0.0.1:4433", "byip", 18080))
            wait_for(lambda: "service 'web' registered" in (tmp_path / "conn.log").read_text(), 20,
                     "connector registered by IP without a port")
            out = tmp_path / "out"
            wait_for(lambda: nsexec(ns, "curl", "-sS", "--max-time", "10", "-o", str(out),
                                    "http://127.0.0.1:18080/blob").returncode == 0, 30, "download via the agent")
            assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob).digest()
            log = (tmp_path / "byip.log").read_text()
            assert "doesn't match" not in log and " ERROR " not in log

            # A name the certificate does not hold: one ERROR line, however often it retries.
            procs.append(_agent(ns, tmp_path, "localhost:4433", "byname", 18081))
            bad = tmp_path / "byname.log"
            wait_for(lambda: " ERROR " in bad.read_text(), 15, "name mismatch logged")
            time.sleep(3.0)   # several reconnect attempts (backoff from 0.2 s)
            errors = [line for line in bad.read_text().splitlines() if " ERROR " in line]
            assert len(errors) == 1, errors
            assert "expected DNS:localhost" in errors[0], errors[0]
            assert "holds IP:127.0.0.1" in errors[0], errors[0]
            assert bad.read_text().count("handshake failed") >= 2   # it kept retrying
        finally:
            for p in reversed(procs):
                stop(p)


def test_agent_by_ip_with_a_dns_only_certificate_says_what_it_holds(tmp_path: Path) -> None:
    ns = f"ztsm{os.getpid() % 100000}"
    with netns(ns):
        procs, _ = _start_world(tmp_path, ns, ["relay.example.com"])
        try:
            agent = _agent(ns, tmp_path, "127.0.0.1:4433", "byip", 18080)
            procs.append(agent)
            log = tmp_path / "byip.log"
            wait_for(lambda: " ERROR " in log.read_text(), 15, "name mismatch logged")
            errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
            assert len(errors) == 1, errors
            assert "expected IP:127.0.0.1" in errors[0] and "holds DNS:relay.example.com" in errors[0], errors[0]
            conn_log = tmp_path / "conn.log"
            wait_for(lambda: "expected IP:127.0.0.1" in conn_log.read_text(), 15, "connector mismatch logged")
            assert agent.poll() is None   # keeps retrying: the certificate may be replaced
        finally:
            for p in reversed(procs):
                stop(p)
