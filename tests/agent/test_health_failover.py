"""Health-checked Connectors with failover, between real processes on loopback.

`ztna intermediate`, two `ztna connector`s serving one service (each with its own backend,
which answers with its own tag) and a userspace `ztna agent` forwarding a local TCP port
(`-L`, TCP over QUIC streams through the relay) and a local UDP port (`-U`). Every check is
on the bytes that come back: which backend answered, and the payload echoed.

* Default TCP connect check: backend A dies → after the checks notice, every new
  connection is answered by B; A comes back → new connections reach A again.
* HTTP check (`check=http:80/healthz=200`): the backends keep serving but report 503.
  When both do, new flows go to the least-recently-failed Connector (A, which failed
  first), and `ztna status` says that no Connector is healthy.
* Direct (P2P) path: the Agent is direct to one Connector, whose backend dies. The
  Connector says so on the direct connection; the Agent leaves that path for new flows
  (the relay steers them to the healthy Connector) and its next punch goes to the healthy
  one.
* UDP probe check (`check=udp:53:...=...`): UDP backend A stops answering the probe →
  every new UDP flow is answered by B.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agent_util import PY, stop, wait_for
from loopback_procs import TcpEcho, free_port

from ztna.certs import init_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web"])
    return d


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "wb")  # noqa: SIM115 - closed with the process by the OS
    return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


class Backend:
    """A tagged TCP backend: an HTTP server whose `/healthz` answers `health` and whose
    `/echo/<token>` answers `<tag>:<token>`. `kill()` closes its listening socket (new
    connections are refused), `revive()` listens on the same port again."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.health = 200
        self.port = free_port(socket.SOCK_STREAM)
        self.server: ThreadingHTTPServer | None = None
        self.revive()

    def revive(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/healthz":
                    code, body = owner.health, b"health"
                elif self.path.startswith("/echo/"):
                    code, body = 200, f"{owner.tag}:{self.path[6:]}".encode()
                else:
                    code, body = 404, b""
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None


class UdpBackend:
    """Answers the probe `ping` with `pong` and anything else with `<tag>:<data>`, in a
    thread; `mute()` stops answering the probe (the service itself still echoes)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag.encode()
        self.answer_probe = True
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            if data == b"ping":
                if self.answer_probe:
                    self.sock.sendto(b"pong", addr)
            else:
                self.sock.sendto(self.tag + b":" + data, addr)

    def close(self) -> None:
        self.sock.close()


@dataclass
class World:
    tmp: Path
    state: Path
    metrics_port: int
    lport: int
    uport: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.tmp.glob("*.log"))

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {name}")

    def status(self, *args: str) -> str:
        res = subprocess.run([PY, "-m", "ztna", "status", "--state-dir", str(self.state), "--name", "hf", *args],
                             capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})
        assert res.returncode == 0, res.stderr
        return res.stdout

    def service(self) -> dict[str, Any]:
        return next(s for s in json.loads(self.status("--json"))["services"] if s["id"] == "web")

    def fetch(self, token: str) -> str:
        """One new TCP connection through the tunnel: which backend answered `token`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.lport}/echo/{token}", timeout=10) as r:
            body = r.read().decode()
        tag, _, echoed = body.partition(":")
        assert echoed == token, body
        return tag

    def udp(self, token: str) -> str:
        """One new UDP flow (a fresh source port) through the tunnel: who answered."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(token.encode(), ("127.0.0.1", self.uport))
            data, _ = s.recvfrom(65535)
        tag, _, echoed = data.decode().partition(":")
        assert echoed == token, data
        return tag


@contextmanager
def world(tmp: Path, pki: Path, services: dict[str, str], p2p: dict[str, int] | None = None,
          agent_args: tuple[str, ...] = ()) -> Iterator[World]:
    """Intermediate (with metrics) + one Connector per entry of `services` (name → its
    `--service` flag; with `p2p`, its P2P port) + a userspace Agent with a TCP and a UDP
    forward."""
    iport = free_port()
    w = World(tmp=tmp, state=tmp / "state", metrics_port=free_port(socket.SOCK_STREAM),
              lport=free_port(socket.SOCK_STREAM), uport=free_port())
    inter = f"127.0.0.1:{iport}"
    try:
        w.procs["intermediate"] = _spawn(
            [PY, "-m", "ztna", "intermediate", "--listen", inter, "--pki", str(pki),
             "--metrics", f"127.0.0.1:{w.metrics_port}"], tmp / "intermediate.log")
        for name, flag in services.items():
            w.procs[name] = _spawn(
                [PY, "-m", "ztna", "connector", "--intermediate", inter, "--server-name", "localhost",
                 "--pki", str(pki), "--p2p-port", str(p2p[name]) if p2p else "off", "--metrics", "off", "--name", name,
                 "--service", flag], tmp / f"connector-{name}.log")
        w.procs["agent"] = _spawn(
            [PY, "-m", "ztna", "agent", "--intermediate", inter, "--server-name", "localhost",
             "--pki", str(pki), "--mode", "userspace", "--name", "hf", "--state-dir", str(w.state),
             "--service", "web=10.100.0.2", "-L", f"127.0.0.1:{w.lport}=web:80",
             "-U", f"127.0.0.1:{w.uport}=web:53", "--p2p-cooldown", "2", *agent_args], tmp / "agent.log")

        def ready() -> bool:
            for p in w.procs.values():
                assert p.poll() is None, w.logs()
            try:
                registered = w.metric("ztna_registrations_total")
                svc = w.service()
            except (OSError, AssertionError, json.JSONDecodeError):
                return False
            return registered >= len(services) + 1 and svc["registration"] == "acked" and bool(svc["connector_up"])
        wait_for(ready, 40, "agent and both connectors registered")
        yield w
    except BaseException:
        print(w.logs())
        raise
    finally:
        for p in reversed(list(w.procs.values())):
            stop(p)


def _tags(fetch: Any, n: int, prefix: str) -> list[str]:
    return [fetch(f"{prefix}{i}-{os.urandom(4).hex()}") for i in range(n)]


def test_tcp_backend_dies_new_connections_fail_over_and_come_back(pki: Path, tmp_path: Path) -> None:
    a, b = Backend("A"), Backend("B")
    with world(tmp_path, pki, {"a": f"web=10.100.0.2;tcp:80=127.0.0.1:{a.port}",
                               "b": f"web=10.100.0.2;tcp:80=127.0.0.1:{b.port}"}) as w:
        assert set(_tags(w.fetch, 24, "both")) == {"A", "B"}    # both serve new flows
        a.kill()
        # Down after 3 failed connects, 2 s apart.
        wait_for(lambda: w.metric("ztna_unhealthy_connectors") == 1, 30, "connector a reported unhealthy")
        tags = _tags(w.fetch, 24, "failover")
        assert tags == ["B"] * 24
        assert w.service()["healthy"] is True      # the pool still has a healthy Connector
        a.revive()
        wait_for(lambda: w.metric("ztna_unhealthy_connectors") == 0, 30, "connector a healthy again")
        assert set(_tags(w.fetch, 24, "back")) == {"A", "B"}
        assert w.metric('ztna_connector_health_transitions_total{state="unhealthy"}') == 1
        assert w.metric('ztna_connector_health_transitions_total{state="healthy"}') == 1
        log = (tmp_path / "connector-a.log").read_text()
        assert "backend unhealthy" in log and "backend healthy again" in log


def test_http_check_none_healthy_goes_to_least_recently_failed_and_status_says_so(
        pki: Path, tmp_path: Path) -> None:
    a, b = Backend("A"), Backend("B")
    check = "check=http:80/healthz=200"
    with world(tmp_path, pki, {"a": f"web=10.100.0.2;tcp:80=127.0.0.1:{a.port};{check}",
                               "b": f"web=10.100.0.2;tcp:80=127.0.0.1:{b.port};{check}"}) as w:
        assert set(_tags(w.fetch, 24, "both")) == {"A", "B"}
        a.health = 503
        wait_for(lambda: w.metric("ztna_unhealthy_connectors") == 1, 30, "a unhealthy (HTTP 503)")
        assert _tags(w.fetch, 16, "one") == ["B"] * 16
        b.health = 500
        wait_for(lambda: w.service()["healthy"] is False, 30, "agent told no connector is healthy")
        assert w.metric("ztna_services_without_healthy_connector") == 1
        # A failed first: it is the least-recently-failed one and takes every new flow.
        assert _tags(w.fetch, 16, "lrf") == ["A"] * 16
        text = w.status()
        assert "no healthy connector" in text and "least-recently-failed" in text, text
        assert "no healthy connector" in (tmp_path / "agent.log").read_text()
        b.health = 200
        wait_for(lambda: w.service()["healthy"] is True, 30, "b healthy again")
        assert _tags(w.fetch, 16, "b-back") == ["B"] * 16
        assert "no healthy connector" not in w.status()


def test_udp_probe_check_fails_over_new_udp_flows(pki: Path, tmp_path: Path) -> None:
    ua, ub = UdpBackend("A"), UdpBackend("B")
    check = "check=udp:53:" + b"ping".hex() + "=" + b"pong".hex()
    try:
        with world(tmp_path, pki, {
                "a": f"web=10.100.0.2;udp:53=127.0.0.1:{ua.port};{check}",
                "b": f"web=10.100.0.2;udp:53=127.0.0.1:{ub.port};{check}"}) as w:
            assert set(_tags(w.udp, 32, "both")) == {"A", "B"}
            ua.answer_probe = False
            wait_for(lambda: w.metric("ztna_unhealthy_connectors") == 1, 30, "a's UDP probe unanswered")
            assert _tags(w.udp, 24, "failover") == ["B"] * 24
            ua.answer_probe = True
            wait_for(lambda: w.metric("ztna_unhealthy_connectors") == 0, 30, "a answers the probe again")
            deadline = time.monotonic() + 10
            seen: set[str] = set()
            while seen != {"A", "B"} and time.monotonic() < deadline:
                seen |= set(_tags(w.udp, 8, "back"))
            assert seen == {"A", "B"}
    finally:
        ua.close()
        ub.close()


def _echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        assert chunk, "echo connection closed"
        got += chunk
    return got


def test_direct_path_to_unhealthy_connector_is_left_for_a_healthy_one(pki: Path, tmp_path: Path) -> None:
    a, b = Backend("A"), Backend("B")
    echo_a, echo_b = TcpEcho(), TcpEcho()
    eport = free_port(socket.SOCK_STREAM)
    ports = {"a": free_port(), "b": free_port()}
    # Port 7 is a TCP echo, unchecked (`check=tcp:80`): a connection to it outlives the
    # health of port 80.
    with world(tmp_path, pki, {"a": f"web=10.100.0.2;tcp:80=127.0.0.1:{a.port};tcp:7=127.0.0.1:{echo_a.port};check=tcp:80",
                               "b": f"web=10.100.0.2;tcp:80=127.0.0.1:{b.port};tcp:7=127.0.0.1:{echo_b.port};check=tcp:80"},
               p2p=ports, agent_args=("-L", f"127.0.0.1:{eport}=web:7")) as w:
        wait_for(lambda: w.service()["path"] == "direct", 30, "direct path")
        peer = w.service()["direct_peer"]
        first = "a" if peer.endswith(f":{ports['a']}") else "b"
        assert peer.endswith(f":{ports[first]}"), peer
        dead, alive = (a, b) if first == "a" else (b, a)
        # Direct: every new connection is answered by that Connector's backend.
        assert set(_tags(w.fetch, 8, "direct")) == {dead.tag}
        held = socket.create_connection(("127.0.0.1", eport), timeout=10)
        first_bytes = os.urandom(20000)
        assert _echo(held, first_bytes) == first_bytes
        dead.kill()
        wait_for(lambda: w.metric("ztna_unhealthy_connectors") == 1, 30, "direct connector unhealthy")
        wait_for(lambda: w.service()["direct_peer"] != peer, 10, "agent left the unhealthy direct path")
        assert _tags(w.fetch, 16, "failover") == [alive.tag] * 16
        # The connection opened on the direct path before stays there and keeps working.
        more = os.urandom(50000)
        assert _echo(held, more) == more
        held.close()
        # After the cooldown the Agent punches again, to the healthy Connector.
        other = [n for n in ports if n != first][0]
        wait_for(lambda: (w.service()["direct_peer"] or "").endswith(f":{ports[other]}"), 40,
                 "direct to the healthy connector")
        assert _tags(w.fetch, 8, "direct-again") == [alive.tag] * 8
        snap = json.loads(w.status("--json"))
        assert snap["p2p"]["unhealthy_departures"] == 1
        assert "leaving the direct path: connector backend unhealthy" in (tmp_path / "agent.log").read_text()
    echo_a.close()
    echo_b.close()
