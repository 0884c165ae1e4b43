"""Helpers for the cluster tests: a real `redis-server` on a free loopback port with its own
temporary directory (never the system service), `ztna intermediate --cluster` processes (the
Intermediate process helper of tests/intermediate), and an in-test client that resumes with
the tickets its process collected, optionally through a UDP hop that records its first flight
(what an attacker on the path could capture and replay)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "intermediate"))

from intermediate_helpers import Forwarder, IntermediateProc, Peer, free_tcp_port  # noqa: E402

from ztna.quic.config import TlsFiles, make_configuration  # noqa: E402
from ztna.quic.connection import ConnectionHandler, ZtnaConnection  # noqa: E402
from ztna.quic.endpoint import QuicEndpoint, bind_udp  # noqa: E402
from ztna.wire import Register, RegistrationAck, Role, encode_control  # noqa: E402

__all__ = ["IntermediateProc", "Peer", "RedisProc", "Forwarder", "Agent", "member"]


class RedisProc:
    """redis-server on 127.0.0.1:`port`, no persistence (a restart comes back empty, the
    hardest case for the members), in `directory`."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it)")
        self.exe = exe
        self.dir = directory
        self.port = port or free_tcp_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProc:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer")

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), for the tests' own look into the store."""
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            parts.append(f"${len(a.encode())}\r\n{a}\r\n".encode())
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"".join(parts))
            time.sleep(0.05)
            return s.recv(65536)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            self._log.close()
        self.proc = None

    stop = kill


def member(pki: Path, redis: RedisProc, log_path: Path, *extra: str) -> IntermediateProc:
    proc = IntermediateProc(["--pki", str(pki), "--handshakes-per-second", "1000"], log_path)
    proc.args += ["--cluster", redis.url, "--advertise", f"127.0.0.1:{proc.port}", *extra]
    return proc



class Agent(ConnectionHandler):
    """An Agent that sends its Register at once (in 0-RTT when the process holds a ticket for
    "localhost", whichever member issued it) and records what comes back."""

    def __init__(self, pki: Path, name: str = "agent") -> None:
        self.tls = TlsFiles.from_dir(pki, name)
        self.messages: list[object] = []
        self.datagrams: list[bytes] = []
        self.acked = asyncio.Event()
        self.ep: QuicEndpoint | None = None
        self.conn: ZtnaConnection | None = None
        self.hop: Forwarder | None = None

    async def connect(self, port: int, service: str = "echo", *, via_hop: bool = False) -> Agent:
        if via_hop:
            self.hop = Forwarder(port)
            port = await self.hop.start()
        self.ep = QuicEndpoint(bind_udp("127.0.0.1", 0))
        cfg = make_configuration(is_client=True, tls=self.tls, server_name="localhost")
        self.conn = self.ep.connect(("127.0.0.1", port), cfg, self)
        self.conn.send_control(encode_control(Register(role=Role.AGENT, service_id=service)))
        await asyncio.wait_for(self.acked.wait(), 10)
        await asyncio.sleep(0.1)  # let the session tickets and the address token arrive
        return self

    def on_message(self, conn: ZtnaConnection, msg: object) -> None:
        self.messages.append(msg)
        if isinstance(msg, RegistrationAck):
            self.acked.set()

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        self.datagrams.append(bytes(data))

    async def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close(0, "test done")
        if self.ep is not None:
            self.ep._flush()
            await asyncio.sleep(0.05)
            self.ep.shutdown_socket()
        if self.hop is not None:
            self.hop.close()


async def echo_through(port: int, size: int, timeout: float = 5.0) -> bool:
    """Send `size` random bytes through an Agent's TCP forward on `port`; True if they all
    come back as sent."""
    body = os.urandom(size)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(body)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(size), timeout)
        writer.close()
        return got == body
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return False
