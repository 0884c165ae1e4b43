"""Real `ztna intermediate`, `ztna connector` and `ztna agent` processes on loopback (no
root, no namespace), a UDP echo backend, and `ztna status` run through a pipe.

Ports are picked free by binding port 0 and closing again: a tiny race with other programs
on the machine, accepted because each process must be told its port up front."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_util import PY, stop, wait_for

from ztna import procs


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return procs.spawn(argv, log=log)


class UdpEcho:
    """A UDP echo server in a thread: every datagram goes back to its sender unchanged."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.received = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            self.received += 1
            self.sock.sendto(data, addr)

    def close(self) -> None:
        self.sock.close()


class TcpEcho:
    """A TCP echo server in a thread (one thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c: socket.socket) -> None:
        with c:
            while True:
                data = c.recv(65536)
                if not data:
                    c.shutdown(socket.SHUT_WR)
                    return
                c.sendall(data)

    def close(self) -> None:
        self.sock.close()


@dataclass
class World:
    tmp: Path
    pki: Path
    state: Path
    name: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def status(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ztna status` with stdout a pipe, exactly as a script would run it."""
        res = subprocess.run([PY, "-m", "ztna", "status", "--state-dir", str(self.state), "--name", self.name, *args],
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "COLUMNS": "80"})
        if check:
            assert res.returncode == 0, res.stderr
        return res

    def snap(self) -> dict[str, Any]:
        return json.loads(self.status("--json").stdout)  # type: ignore[no-any-return]

    def try_snap(self) -> dict[str, Any] | None:
        res = self.status("--json", check=False)
        return json.loads(res.stdout) if res.returncode == 0 else None

    def service(self, sid: str = "web") -> dict[str, Any]:
        return next(s for s in self.snap()["services"] if s["id"] == sid)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log"))


@contextmanager
def loopback_world(tmp: Path, pki: Path, *, connector_services: list[str], agent_args: list[str],
                   p2p: bool, agent_services: tuple[str, ...] = ("web=10.100.0.2,fd00:100::2",),
                   name: str = "t", intermediate_args: tuple[str, ...] = (),
                   connector_args: tuple[str, ...] = ()) -> Iterator[World]:
    """Intermediate + Connector (+ direct P2P server when `p2p`) + userspace Agent."""
    iport = free_port()
    world = World(tmp=tmp, pki=pki, state=tmp / "state", name=name)
    inter = f"127.0.0.1:{iport}"
    try:
        world.procs["intermediate"] = _spawn(
            [PY, "-m", "ztna", "intermediate", "--listen", inter, "--pki", str(pki), "--metrics", "off",
             *intermediate_args],
            tmp / "intermediate.log")
        conn = [PY, "-m", "ztna", "connector", "--intermediate", inter, "--server-name", "localhost",
                "--pki", str(pki), "--p2p-port", "0" if p2p else "off", "--metrics", "off", *connector_args]
        for svc in connector_services:
            conn += ["--service", svc]
        world.procs["connector"] = _spawn(conn, tmp / "connector.log")
        agent = [PY, "-m", "ztna", "agent", "--intermediate", inter, "--server-name", "localhost",
                 "--pki", str(pki), "--mode", "userspace", "--name", name, "--state-dir", str(world.state),
                 *agent_args]
        for svc in agent_services:
            agent += ["--service", svc]
        world.procs["agent"] = _spawn(agent, tmp / "agent.log")

        def ready() -> bool:
            for p in world.procs.values():
                assert p.poll() is None, world.logs()
            snap = world.try_snap()
            return snap is not None and snap["intermediate"]["state"] == "connected" and all(
                s["registration"] == "acked" and s["connector_up"] for s in snap["services"])
        wait_for(ready, 40, "agent connected and registered, connector up")
        yield world
    finally:
        for p in reversed(list(world.procs.values())):
            stop(p)
