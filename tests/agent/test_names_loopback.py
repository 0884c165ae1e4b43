"""Apps by DNS name without root: real Intermediate, Connector and userspace Agent processes
on loopback, the Connector resolving with the system resolver (`localhost`, which every
system resolves), over the relay and over the direct P2P connection.

A `-L` forward to the name and SOCKS5 CONNECT with the name echo bytes exactly through a TCP
echo backend; a name outside every service is a SOCKS error from the Agent itself; a name
the Agent's patterns cover but the Connector's do not is refused by the Connector
(NOT_AUTHORIZED -> SOCKS reply 2), so the Agent cannot widen what it may reach."""

from __future__ import annotations

import os
import socket
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from agent_util import wait_for  # noqa: E402
from loopback_procs import TcpEcho, World, free_port, loopback_world  # noqa: E402

from ztna.certs import init_pki


def _socks_connect(port: int, name: str, dport: int) -> tuple[int, socket.socket]:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    raw = name.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes((len(raw),)) + raw + struct.pack("!H", dport))
    head = b""
    while len(head) < 10:
        chunk = s.recv(10 - len(head))
        if not chunk:
            break
        head += chunk
    return (head[1] if len(head) > 1 else -1), s


def _echo(s: socket.socket, size: int) -> None:
    payload = os.urandom(size)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    assert got == payload


def _socks_port(w: World) -> int:
    listeners = w.snap()["userspace"]["listeners"]
    text = next(t for t in listeners if t.startswith("socks5 "))
    return int(text.split(" ")[1].rsplit(":", 1)[1])


@pytest.mark.parametrize("path", ["relay", "direct"])
def test_names_forward_and_socks(tmp_path: Path, path: str) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["local"])
    echo = TcpEcho()
    lport = free_port(socket.SOCK_STREAM)
    try:
        with loopback_world(tmp_path, pki, p2p=path == "direct",
                            connector_services=[f"local=localhost;tcp:7=:{echo.port}"],
                            agent_services=("local=localhost,*.wide.test",),
                            agent_args=["-L", f"127.0.0.1:{lport}=localhost:7", "--socks", "127.0.0.1:0"]) as w:
            if path == "direct":
                wait_for(lambda: w.service("local")["path"] == "direct", 30, "direct path")
            _echo(socket.create_connection(("127.0.0.1", lport), timeout=20), 200_000)
            code, s = _socks_connect(_socks_port(w), "LocalHost", 7)
            assert code == 0, w.logs()
            _echo(s, 50_000)
            code, s = _socks_connect(_socks_port(w), "www.example.org", 7)
            s.close()
            assert code == 4                                   # outside every service: ours
            code, s = _socks_connect(_socks_port(w), "x.wide.test", 7)
            s.close()
            assert code == 2                                   # the Connector's NOT_AUTHORIZED
            snap = w.snap()
            assert snap["userspace"]["tcp_opened"] == 2
            assert (snap["userspace"]["tcp_direct"] >= 2) == (path == "direct")
            log = (tmp_path / "connector.log").read_text()
            assert "service local name localhost:7 -> 127.0.0.1:" in log, log[-2000:]
            assert "x.wide.test is outside the patterns of service local" in log
    finally:
        echo.close()
