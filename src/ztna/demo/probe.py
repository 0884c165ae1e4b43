"""The demo's traffic: what a user would do with curl, an echo client and ping (sent with
our own ICMP socket, so the demo needs no ping binary).

Plain blocking sockets. Each function opens its sockets in the calling thread's network
namespace, so the runner calls them through ``ztna.lab.netns.in_netns`` to act "from the
Agent's machine" (a thread that entered the agent namespace), or directly in local mode.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import struct
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


class _SocksHTTPConnection(http.client.HTTPConnection):
    """HTTP through a SOCKS5 proxy that is handed the host *name* (like curl
    --socks5-hostname): the proxy, not we, decides where the name leads."""

    def __init__(self, host: str, port: int, *, proxy: tuple[str, int], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.proxy = proxy

    def connect(self) -> None:
        sock = socket.create_connection(self.proxy, timeout=self.timeout)
        try:
            sock.sendall(b"\x05\x01\x00")
            if sock.recv(2) != b"\x05\x00":
                raise OSError("SOCKS5 proxy refused 'no authentication'")
            name = self.host.encode("ascii")
            sock.sendall(b"\x05\x01\x00\x03" + bytes((len(name),)) + name + struct.pack("!H", self.port))
            head = sock.recv(4)
            if len(head) < 4 or head[1] != 0:
                raise OSError(f"SOCKS5 CONNECT {self.host}:{self.port} refused (reply {head[1:2].hex() or '?'})")
            sock.recv({1: 4, 4: 16}.get(head[3], 0) + 2)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def dns_query(server: str, name: str, rdtype: str = "A", *, timeout: float = 3.0) -> list[str]:
    """The addresses `server` answers for `name` (empty on any error code)."""
    import dns.message
    import dns.query
    import dns.rcode

    reply = dns.query.udp(dns.message.make_query(name, rdtype), server, timeout=timeout)
    if reply.rcode() != dns.rcode.NOERROR:
        return []
    return [rr.address for rrset in reply.answer for rr in rrset]


def http_get(host: str, port: int, path: str, *, timeout: float = 30.0,
             socks: tuple[str, int] | None = None) -> Download:
    """GET ``path``, hashing the body as it streams in (never held in memory); with
    ``socks``, through that SOCKS5 proxy, which gets ``host`` as a name."""
    digest = hashlib.sha256()
    n = 0
    start = time.monotonic()
    conn = (http.client.HTTPConnection(host, port, timeout=timeout) if socks is None
            else _SocksHTTPConnection(host, port, proxy=socks, timeout=timeout))
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
            except TimeoutError:
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


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmp_socket(v6: bool) -> tuple[socket.socket, bool]:
    """(socket, raw?): an ICMP datagram ("ping") socket where ping_group_range allows it, else
    a raw socket (root). Either way no external tool is needed: a fresh system may lack ping."""
    family, proto = ((socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6
                     else (socket.AF_INET, socket.IPPROTO_ICMP))
    try:
        return socket.socket(family, socket.SOCK_DGRAM, proto), False
    except OSError:  # EACCES: our group is outside net.ipv4.ping_group_range
        return socket.socket(family, socket.SOCK_RAW, proto), True


def icmp_echo(host: str, *, count: int = 3, timeout: float = 2.0,
              interval: float = 0.2) -> tuple[int, float | None, str]:
    """Send ``count`` ICMP echo requests to ``host`` from this thread's namespace and check
    that each reply carries our payload back byte for byte.

    Returns (replies that matched, average RTT in ms or None, one line saying what happened).
    """
    v6 = ":" in host
    request, reply = (128, 129) if v6 else (8, 0)
    try:
        sock, raw = _icmp_socket(v6)
    except OSError as exc:
        return 0, None, f"cannot open an ICMP socket: {exc.strerror or exc}"
    ident = os.getpid() & 0xFFFF
    rtts: list[float] = []
    problems: list[str] = []
    with sock:
        for seq in range(1, count + 1):
            payload = os.urandom(32) + seq.to_bytes(2, "big")
            header = struct.pack("!BBHHH", request, 0, 0, ident, seq)
            packet = header + payload
            if not v6:  # the kernel fills in the ICMPv6 checksum (it covers a pseudo-header)
                packet = header[:2] + _icmp_checksum(packet).to_bytes(2, "big") + packet[4:]
            sent = time.monotonic()
            try:
                sock.sendto(packet, (host, 0))
            except OSError as exc:
                problems.append(f"seq {seq}: send failed: {exc.strerror or exc}")
                time.sleep(interval)
                continue
            deadline = sent + timeout
            got = False
            while not got and (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, _addr = sock.recvfrom(65535)
                except TimeoutError:
                    break
                if raw and not v6:  # a raw IPv4 socket hands us the IP header too
                    data = data[(data[0] & 0x0F) * 4:]
                if len(data) < 8 or data[0] != reply:
                    continue  # our own request seen on a raw socket, or unrelated ICMP
                r_ident, r_seq = struct.unpack("!HH", data[4:8])
                # A datagram socket's identifier is chosen by the kernel; a raw one is ours.
                if r_seq != seq or (raw and r_ident != ident):
                    continue
                if data[8:] != payload:
                    problems.append(f"seq {seq}: reply payload differs from the request")
                    got = True
                    continue
                rtts.append((time.monotonic() - sent) * 1000)
                got = True
            if not got:
                problems.append(f"seq {seq}: no reply within {timeout:g} s")
            time.sleep(interval)
    avg = round(sum(rtts) / len(rtts), 3) if rtts else None
    summary = f"{len(rtts)}/{count} echo replies with the request's payload"
    if problems:
        summary += " (" + "; ".join(problems) + ")"
    return len(rtts), avg, summary
