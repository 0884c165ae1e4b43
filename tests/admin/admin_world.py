"""Real `ztna intermediate`, `ztna connector` and `ztna agent` processes on loopback for the
admin API, dashboard and revocation tests, a TCP echo backend that can be killed, and a
small HTTP client for the admin API.

Ports are picked free by binding port 0 and closing again (each process must be told its
port up front): a tiny race with other programs, accepted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PY = sys.executable


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class TcpEcho:
    """A TCP echo server in threads; `close()` kills it (listener and open connections)."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c: socket.socket) -> None:
        try:
            while data := c.recv(65536):
                c.sendall(data)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def echo_roundtrip(port: int, payload: bytes, sock: socket.socket | None = None) -> bytes:
    """Send `payload` to a local forward and read as many bytes back."""
    own = sock is None
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        if own:
            s.close()


def http(url: str, *, method: str = "GET", token: str | None = None, body: Any = None,
         timeout: float = 5.0) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def metrics(port: int) -> dict[str, float]:
    """`/metrics` as {'name{label="value",...}': value} (labels sorted), via the client's parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


@dataclass
class World:
    tmp: Path
    pki: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        fh = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process by the OS
        proc = subprocess.Popen([PY, "-m", "ztna", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs[name] = proc
        return proc

    def intermediate(self, *extra: str) -> str:
        port = free_port()
        self.ports["intermediate"] = port
        self.ports["intermediate_metrics"] = free_port(socket.SOCK_STREAM)
        self.spawn("intermediate", ["intermediate", "--listen", f"127.0.0.1:{port}", "--pki", str(self.pki),
                                    "--metrics", f"127.0.0.1:{self.ports['intermediate_metrics']}", *extra])
        wait_for(lambda: self._up(self.ports["intermediate_metrics"]), 20, "intermediate /healthz")
        return f"127.0.0.1:{port}"

    def connector(self, name: str, services: list[str], *extra: str, p2p: bool = False,
                  cert: str = "connector") -> None:
        mport = free_port(socket.SOCK_STREAM)
        self.ports[f"{name}_metrics"] = mport
        argv = ["connector", "--intermediate", f"127.0.0.1:{self.ports['intermediate']}",
                "--server-name", "localhost", "--cert", str(self.pki / f"{cert}.pem"),
                "--key", str(self.pki / f"{cert}.key"), "--ca", str(self.pki / "ca.pem"), "--name", name,
                "--p2p-port", "0" if p2p else "off", "--metrics", f"127.0.0.1:{mport}", *extra]
        for svc in services:
            argv += ["--service", svc]
        self.spawn(name, argv)

    def agent(self, name: str, forward_port: int, *extra: str, cert: str = "agent",
              service: str = "web=10.100.0.2") -> None:
        self.spawn(name, ["agent", "--intermediate", f"127.0.0.1:{self.ports['intermediate']}",
                          "--server-name", "localhost", "--cert", str(self.pki / f"{cert}.pem"),
                          "--key", str(self.pki / f"{cert}.key"), "--ca", str(self.pki / "ca.pem"),
                          "--mode", "userspace", "--name", name, "--state-dir", str(self.tmp / f"state-{name}"),
                          "--service", service, "-L", f"127.0.0.1:{forward_port}=web:80", *extra])

    def status(self, name: str) -> dict[str, Any] | None:
        res = subprocess.run([PY, "-m", "ztna", "status", "--state-dir", str(self.tmp / f"state-{name}"),
                              "--name", name, "--json"], capture_output=True, text=True, timeout=30)
        return json.loads(res.stdout) if res.returncode == 0 else None

    @staticmethod
    def _up(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> None:
        for name, p in self.procs.items():
            assert p.poll() is None, f"{name} exited {p.returncode}\n{self.logs()}"

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log"))

    def signal(self, name: str, sig: int = signal.SIGHUP) -> None:
        self.procs[name].send_signal(sig)

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
