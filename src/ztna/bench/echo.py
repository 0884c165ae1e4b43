"""Tiny TCP/UDP echo server and latency clients for ``ztna bench`` (run inside lab nodes).

``python -m ztna.bench.echo serve --tcp 7000 --udp 7`` echoes every TCP byte and every
UDP datagram back until killed. The clients print one JSON object on stdout:

* ``tcp HOST PORT --count N`` opens one connection (TCP_NODELAY) and does N sequential
  request/response round trips of ``--size`` bytes, then opens ``--connects`` fresh
  connections and times each 3-way handshake + one round trip (what a short HTTP
  request costs through a tunnel, including any per-connection set-up the tunnel does).
* ``udp HOST PORT --count N`` sends N sequential datagrams and waits up to ``--wait``
  seconds for each echo (a ping over UDP; losses are counted, never retried).

Numbers are in milliseconds; ``p50``/``p95`` are nearest-rank percentiles. The clients
never raise on a network failure: they report ``{"error": ...}`` with exit status 1, so
the harness can put the reason into the row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import socket
import sys
import threading
import time
from typing import Any

SIZE_DEFAULT = 64


def percentile(samples: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (``pct`` in 0..100) of ``samples``; None when empty."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples_ms: list[float]) -> dict[str, Any]:
    return {
        "n": len(samples_ms),
        "p50_ms": _r(percentile(samples_ms, 50)),
        "p95_ms": _r(percentile(samples_ms, 95)),
        "min_ms": _r(min(samples_ms) if samples_ms else None),
        "max_ms": _r(max(samples_ms) if samples_ms else None),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# ---------------------------------------------------------------------- server
def _tcp_conn(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                conn.sendall(data)
            except OSError:
                return


def _tcp_server(port: int) -> None:
    srv = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_tcp_conn, args=(conn,), daemon=True).start()


def _udp_server(port: int) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("", port))
    while True:
        data, addr = sock.recvfrom(65535)
        try:
            sock.sendto(data, addr)
        except OSError:
            pass


def serve(tcp: int | None, udp: int | None) -> None:
    threads = []
    if tcp:
        threads.append(threading.Thread(target=_tcp_server, args=(tcp,), daemon=True))
    if udp:
        threads.append(threading.Thread(target=_udp_server, args=(udp,), daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


# ---------------------------------------------------------------------- clients
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed mid-echo")
        buf += chunk
    return bytes(buf)


def tcp_client(host: str, port: int, count: int, size: int, connects: int,
               timeout: float) -> dict[str, Any]:
    payload = os.urandom(size)
    rtts: list[float] = []
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        first_connect = (time.perf_counter() - t0) * 1000
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t = time.perf_counter()
            sock.sendall(payload)
            if _recv_exact(sock, size) != payload:
                raise ConnectionError("echo mismatch")
            rtts.append((time.perf_counter() - t) * 1000)
    conn_rtts: list[float] = []
    for _ in range(connects):
        t = time.perf_counter()
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(payload)
            if _recv_exact(sock, size) != payload:
                raise ConnectionError("echo mismatch")
        conn_rtts.append((time.perf_counter() - t) * 1000)
    return {"rtt": summary(rtts), "connect_rtt": summary(conn_rtts),
            "first_connect_ms": round(first_connect, 4), "size": size}


def udp_client(host: str, port: int, count: int, size: int, wait: float) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rtts: list[float] = []
    lost = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        for i in range(count):
            payload = i.to_bytes(4, "big") + os.urandom(max(0, size - 4))
            t = time.perf_counter()
            sock.send(payload)
            deadline = t + wait
            while True:
                left = deadline - time.perf_counter()
                if left <= 0 or not sel.select(left):
                    lost += 1
                    break
                try:
                    data = sock.recv(65535)
                except ConnectionRefusedError:
                    continue
                if data == payload:
                    rtts.append((time.perf_counter() - t) * 1000)
                    break  # a stale echo of an earlier probe is skipped
    return {"rtt": summary(rtts), "sent": count, "lost": lost, "size": size}


def wait_udp(host: str, port: int, deadline_s: float) -> dict[str, Any]:
    """Probe until the first echo arrives (tunnel ready); reports the seconds it took."""
    t0 = time.perf_counter()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        sock.settimeout(0.2)
        while time.perf_counter() - t0 < deadline_s:
            try:
                sock.send(b"ready?")
                if sock.recv(100) == b"ready?":
                    return {"ready_s": round(time.perf_counter() - t0, 4)}
            except OSError:
                time.sleep(0.05)
    raise TimeoutError(f"no UDP echo from {host}:{port} within {deadline_s:.0f} s")


def wait_tcp(host: str, port: int, deadline_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    last: Exception | None = None
    while time.perf_counter() - t0 < deadline_s:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                sock.sendall(b"x")
                if _recv_exact(sock, 1) == b"x":
                    return {"ready_s": round(time.perf_counter() - t0, 4)}
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"no TCP echo from {host}:{port} within {deadline_s:.0f} s ({last})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ztna.bench.echo")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tcp", type=int)
    s.add_argument("--udp", type=int)
    for name in ("tcp", "udp", "wait-udp", "wait-tcp"):
        c = sub.add_parser(name)
        c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("--count", type=int, default=200)
        c.add_argument("--size", type=int, default=SIZE_DEFAULT)
        c.add_argument("--connects", type=int, default=20)
        c.add_argument("--timeout", type=float, default=5.0)
        c.add_argument("--wait", type=float, default=1.0)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args.tcp, args.udp)
        return 0
    try:
        if args.cmd == "tcp":
            out = tcp_client(args.host, args.port, args.count, args.size, args.connects,
                             args.timeout)
        elif args.cmd == "udp":
            out = udp_client(args.host, args.port, args.count, args.size, args.wait)
        elif args.cmd == "wait-udp":
            out = wait_udp(args.host, args.port, args.timeout)
        else:
            out = wait_tcp(args.host, args.port, args.timeout)
    except (OSError, TimeoutError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
