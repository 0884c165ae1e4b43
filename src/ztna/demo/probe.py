"""The demo's traffic: what a user would do with curl, an echo client and ping.

Plain blocking sockets. Each function opens its sockets in the calling thread's network
namespace, so the runner calls them through ``ztna.lab.netns.in_netns`` to act "from the
Agent's machine" (a thread that entered the agent namespace), or directly in local mode.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Download:
    nbytes: int
    sha256: str
    seconds: float
    status: int
    error: str | None = None  # set when the transfer broke off after the response began

    @property
    def mbps(self) -> float:
        return self.nbytes * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0


def http_get(host: str, port: int, path: str, *, timeout: float = 30.0) -> Download:
    """GET ``path``, hashing the body as it streams in (never held in memory)."""
    digest = hashlib.sha256()
    n = 0
    start = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "ztna-demo"})
        resp = conn.getresponse()
        status = resp.status
        try:
            while True:
                chunk = resp.read1(256 * 1024)
                if not chunk:
                    break
                digest.update(chunk)
                n += len(chunk)
        except OSError as exc:  # a stall (timeout) or reset mid-body: report how far it got
            return Download(n, digest.hexdigest(), time.monotonic() - start, status,
                            error=f"{type(exc).__name__}: {exc or 'timed out'}")
    finally:
        conn.close()
    return Download(n, digest.hexdigest(), time.monotonic() - start, status)


def http_json(
    host: str, port: int, path: str, *, timeout: float = 1.0
) -> tuple[int, dict[str, Any]]:
    """GET a small JSON document (the components' /healthz): (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body or b"{}")
    finally:
        conn.close()


def udp_echo(
    host: str, port: int, payload: bytes, *, timeout: float = 1.0, attempts: int = 3
) -> bytes | None:
    """Send ``payload`` and return the first reply (``None`` if none in any attempt).

    Replies that are not our payload (a late answer to an earlier attempt) are returned
    as they are, so the caller's byte comparison decides."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        for _ in range(attempts):
            try:
                sock.sendto(payload, (host, port))
                data, _addr = sock.recvfrom(65535)
                return data
            except (TimeoutError, socket.timeout):
                continue
            except OSError:  # no route yet (TUN coming up), refused: wait and retry
                time.sleep(timeout)
    return None


def tcp_reachable(host: str, port: int, *, timeout: float = 1.5) -> bool:
    """True if a TCP connection to host:port can be established."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_RTT_RE = re.compile(r"= [\d.]+/([\d.]+)/")
_RECV_RE = re.compile(r"(\d+) (?:packets )?received")


def ping(host: str, *, count: int = 3, netns: str | None = None) -> tuple[bool, float | None, str]:
    """``ping -c COUNT host`` (in ``netns``): (all answered, avg RTT ms, output)."""
    tool = shutil.which("ping")
    if tool is None:
        return False, None, "ping is not installed"
    argv = [tool, "-c", str(count), "-i", "0.2", "-W", "2", host]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=count * 3 + 5)
    out = proc.stdout + proc.stderr
    got = _RECV_RE.search(out)
    rtt = _RTT_RE.search(out)
    ok = proc.returncode == 0 and got is not None and int(got.group(1)) == count
    return ok, float(rtt.group(1)) if rtt else None, out.strip()
