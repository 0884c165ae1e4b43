"""Helpers for the Intermediate's process tests: a real `ztna intermediate` subprocess on
free loopback ports, the `ztna client` CLI as a subprocess (--json), and in-test peers built
on the QUIC adapter (an echoing Connector that answers 0x30 with 0x31 and swapped
addresses, plain Agents, raw registrations)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from ztna import procs
from ztna.netstack.packets import PROTO_UDP, build_udp_packet, parse_ip, parse_udp
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.wire import (
    TO_CONNECTOR,
    ControlMessage,
    Register,
    RegistrationAck,
    RegistrationNack,
    Role,
    decode_to_connector,
    encode_control,
    encode_from_connector,
)

ZTNA = [sys.executable, "-m", "ztna"]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class IntermediateProc:
    """`ztna intermediate` in a subprocess; `start()` waits until /healthz answers 200."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_udp_port()
        self.metrics_port = free_tcp_port()
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> IntermediateProc:
        cmd = [*ZTNA, "intermediate", "--listen", f"[::]:{self.port}",
               "--metrics", f"127.0.0.1:{self.metrics_port}", *self.args]
        self.proc = procs.spawn(cmd, log=self.log_path, env=os.environ)

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=1) as r:
                return r.status == 200

        procs.wait_until(healthy, timeout=timeout, what="intermediate not healthy",
                         watch=[self.proc], retry_on=(OSError,), error=RuntimeError, detail=self.log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return procs.stop(self.proc, grace=10)


async def cli_client(*args: str, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """Run `ztna client --json ARGS` without blocking the event loop (in-test peers keep running)."""
    proc = await asyncio.create_subprocess_exec(
        *ZTNA, "client", "--json", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    text = out.decode().strip()
    try:
        result = json.loads(text.splitlines()[-1]) if text else {}
    except json.JSONDecodeError:
        result = {}
    result["_stderr"] = err.decode(errors="replace")
    assert proc.returncode is not None
    return proc.returncode, result


class Peer(ConnectionHandler):
    """An in-test client on the adapter. With `echo=True` it answers every 0x30 UDP packet
    with a 0x31 whose IP addresses and UDP ports are swapped (a minimal echoing Connector)."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.messages: list[object] = []
        self.datagrams: list[bytes] = []
        self.echoed = 0
        self.closed_reason: str | None = None
        self.conn: ZtnaConnection | None = None
        self.ep: QuicEndpoint | None = None

    async def connect(self, host: str, port: int, tls: TlsFiles, timeout: float = 5.0) -> Peer:
        self.ep = QuicEndpoint(bind_udp("::" if ":" in host else "0.0.0.0", 0))
        config = make_configuration(is_client=True, tls=tls, server_name="localhost")
        self.conn = self.ep.connect((host, port), config, self)
        await asyncio.wait_for(self.conn.wait_handshake(), timeout)
        return self

    async def register(self, role: Role, service: str, timeout: float = 5.0) -> object:
        assert self.conn is not None
        self.conn.send_control(encode_control(Register(role=role, service_id=service)))
        reply = await self.wait_message(
            lambda m: isinstance(m, RegistrationAck | RegistrationNack) and m.service_id == service, timeout
        )
        return reply

    async def wait_message(self, pred: Any, timeout: float = 5.0) -> object:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for m in self.messages:
                if pred(m):
                    return m
            await asyncio.sleep(0.01)
        raise TimeoutError(f"no matching message; got {self.messages}")

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        self.messages.append(msg)

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        if self.echo and data and data[0] == TO_CONNECTOR:
            agent_id, _service, packet = decode_to_connector(data)
            ip = parse_ip(packet)
            if ip.proto == PROTO_UDP:
                udp = parse_udp(packet, ip)
                reply = build_udp_packet(ip.dst, ip.src, udp.dport, udp.sport, udp.payload)
                conn.send_datagram(encode_from_connector(agent_id, reply))
                self.echoed += 1
            return
        self.datagrams.append(bytes(data))

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None:
        self.closed_reason = reason

    async def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close(0, "test done")
        if self.ep is not None:
            self.ep._flush()
            await asyncio.sleep(0.05)
            self.ep.shutdown_socket()


class Forwarder(asyncio.DatagramProtocol):
    """A UDP hop between a client and one server that records the client's first flight
    (what a replay test sends again): the client talks to `start()`'s port, the hop
    forwards to the server and back."""

    def __init__(self, server_port: int) -> None:
        self.server = ("127.0.0.1", server_port)
        self.client: tuple[str, int] | None = None
        self.server_answered = False
        self.first_flight: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.upstream: socket.socket | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        up.setblocking(False)
        up.bind(("127.0.0.1", 0))
        self.upstream = up
        loop.add_reader(up.fileno(), self._from_server)
        return int(self.transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client = addr
        if not self.server_answered:
            self.first_flight.append(data)
        assert self.upstream is not None
        self.upstream.sendto(data, self.server)

    def _from_server(self) -> None:
        assert self.upstream is not None and self.transport is not None
        while True:
            try:
                data, _ = self.upstream.recvfrom(65535)
            except BlockingIOError:
                return
            self.server_answered = True
            if self.client is not None:
                self.transport.sendto(data, self.client)

    def close(self) -> None:
        if self.upstream is not None:
            asyncio.get_running_loop().remove_reader(self.upstream.fileno())
            self.upstream.close()
        if self.transport is not None:
            self.transport.close()

