"""Small traffic tools the root tests run inside a namespace (stdlib only).

    flow_probe.py udp-echo PORT                 UDP echo server on 127.0.0.1:PORT
    flow_probe.py udp IP PORT N TIMEOUT         N flows (one socket each), one datagram each, echo checked
    flow_probe.py http IP PORT PATH N SHA256    N concurrent HTTP/1.0 GETs (a TCP connection each), body sha256 checked

The clients print one JSON line: {"ok": n, "failed": [reasons], "seconds": elapsed}.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time


def udp_echo(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    while True:
        data, addr = s.recvfrom(65535)
        s.sendto(data, addr)


def udp_flows(ip: str, port: int, n: int, timeout: float) -> dict[str, object]:
    failed: list[str] = []
    ok = 0
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        s.connect((ip, port))
        payload = os.urandom(64)
        s.send(payload)
        socks.append((s, payload))
    for s, payload in socks:
        try:
            if s.recv(65535) == payload:
                ok += 1
            else:
                failed.append(f"port {s.getsockname()[1]}: wrong echo")
        except OSError as exc:
            failed.append(f"port {s.getsockname()[1]}: {exc or 'timeout'}")
        s.close()
    return {"ok": ok, "failed": failed}


def http_gets(ip: str, port: int, path: str, n: int, want: str) -> dict[str, object]:
    results: list[str | None] = [None] * n

    def one(i: int) -> None:
        try:
            with socket.create_connection((ip, port), timeout=10) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
                buf = bytearray()
                while chunk := s.recv(65536):
                    buf += chunk
            body = bytes(buf).split(b"\r\n\r\n", 1)[1]
            got = hashlib.sha256(body).hexdigest()
            results[i] = "ok" if got == want else f"sha256 {got[:12]} of {len(body)} bytes"
        except OSError as exc:
            results[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"ok": results.count("ok"), "failed": [r for r in results if r != "ok"]}


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "udp-echo":
        udp_echo(int(args[0]))
        return
    started = time.monotonic()
    if mode == "udp":
        out = udp_flows(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif mode == "http":
        out = http_gets(args[0], int(args[1]), args[2], int(args[3]), args[4])
    else:
        raise SystemExit(f"unknown mode {mode}")
    out["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
