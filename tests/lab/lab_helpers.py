"""Tiny UDP programs run inside lab namespaces (stdlib only, every loop time-bounded).

    python -c HELPER server PORT FAMILY             rendezvous: tells each of two peers the
                                                    other's mapped (public) address
    python -c HELPER peer NAME SRV_HOST SRV_PORT PORT FAMILY TIMEOUT
                                                    hole punch; prints OK/FAIL + mapped addr
    python -c HELPER count PORT FAMILY SECONDS      counts datagrams until 1 s of silence
    python -c HELPER blast HOST PORT FAMILY N       sends N datagrams, 2 ms apart
    python -c HELPER echo PORT FAMILY               UDP echo
    python -c HELPER ask HOST PORT FAMILY TIMEOUT   one request; rc 0 when echoed
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

HELPER = r'''
import socket, sys, time
cmd, args = sys.argv[1], sys.argv[2:]
def sock(fam, port):
    s = socket.socket(socket.AF_INET6 if fam == "6" else socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if fam == "6" else "0.0.0.0", int(port)))
    return s
if cmd == "server":
    s = sock(args[1], args[0]); s.settimeout(0.2); peers = {}
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try: data, addr = s.recvfrom(2048)
        except socket.timeout: continue
        if data.startswith(b"REG "):
            peers[data[4:].decode()] = addr[:2]
            if len(peers) == 2:
                for name, (h, p) in peers.items():
                    (oh, op), = [v for k, v in peers.items() if k != name]
                    s.sendto(f"PEER {oh} {op} {h} {p}".encode(), (h, p))
elif cmd == "peer":
    name, sh, sp, port, fam, timeout = args
    s = sock(fam, port); s.settimeout(0.05); end = time.monotonic() + float(timeout)
    peer = mapped = None; last_reg = 0.0
    while peer is None and time.monotonic() < end:
        if time.monotonic() - last_reg > 0.2:
            s.sendto(b"REG " + name.encode(), (sh, int(sp))); last_reg = time.monotonic()
        try: data, addr = s.recvfrom(2048)
        except socket.timeout: continue
        if data.startswith(b"PEER "):
            _, oh, op, mh, mp = data.decode().split()
            peer, mapped = (oh, int(op)), f"{mh}:{mp}"
    ok = False
    while peer is not None and not ok and time.monotonic() < end:
        s.sendto(b"PUNCH " + name.encode(), peer)
        try: data, addr = s.recvfrom(2048)
        except socket.timeout: continue
        ok = addr[:2] == peer and data.startswith(b"PUNCH ")
    if ok:  # keep punching a little so the other side gets its datagram too
        for _ in range(10): s.sendto(b"PUNCH " + name.encode(), peer); time.sleep(0.05)
    print(("OK" if ok else "FAIL"), mapped, flush=True)
    sys.exit(0 if ok else 1)
elif cmd == "count":
    s = sock(args[1], args[0]); s.settimeout(0.1); n = 0; end = time.monotonic() + float(args[2])
    print("ready", flush=True); last = None
    while time.monotonic() < end and (last is None or time.monotonic() - last < 1.0):
        try: data, addr = s.recvfrom(2048)
        except socket.timeout: continue
        if data == b"x": n += 1; last = time.monotonic()
    print(n, flush=True)
elif cmd == "blast":
    s = sock(args[2], 0)
    for _ in range(int(args[3])): s.sendto(b"x", (args[0], int(args[1]))); time.sleep(0.002)
elif cmd == "echo":
    s = sock(args[1], args[0]); s.settimeout(0.2); end = time.monotonic() + 30
    print("ready", flush=True)
    while time.monotonic() < end:
        try: data, addr = s.recvfrom(2048)
        except socket.timeout: continue
        s.sendto(data, addr)
elif cmd == "ask":
    s = sock(args[2], 0); s.settimeout(0.2); end = time.monotonic() + float(args[3])
    while time.monotonic() < end:
        s.sendto(b"ping", (args[0], int(args[1])))
        try: data, addr = s.recvfrom(2048)
        except socket.timeout: continue
        sys.exit(0 if data == b"ping" else 2)
    sys.exit(1)
'''


def helper(*args: object) -> list[str]:
    return [sys.executable, "-c", HELPER, *map(str, args)]


def spawn_ready(lab: Any, node: str, *args: object) -> subprocess.Popen[str]:
    """Spawn a helper that prints "ready" once bound, and wait for that line."""
    proc: subprocess.Popen[str] = lab.spawn(node, helper(*args), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def punch(lab: Any, family: int = 4, timeout: float = 3.0) -> tuple[bool, bool, str, str]:
    """Agent and connector both bind UDP 40000 and punch.

    Returns (ok_a, ok_b, mapped_a, mapped_b); mapped is "host:port" as the server saw it.
    """
    fam = str(family)
    lab.spawn("relay", helper("server", 3478, fam))
    srv = lab.addr("relay", family)
    peers = [
        lab.spawn(node, helper("peer", name, srv, 3478, 40000, fam, timeout),
                  stdout=subprocess.PIPE, text=True)
        for node, name in (("agent", "A"), ("conn", "B"))
    ]  # fmt: skip
    a, b = peers
    out_a, _ = a.communicate(timeout=timeout + 5)
    out_b, _ = b.communicate(timeout=timeout + 5)
    word_a, _, mapped_a = out_a.strip().partition(" ")
    word_b, _, mapped_b = out_b.strip().partition(" ")
    ok_a = a.returncode == 0 and word_a == "OK"
    ok_b = b.returncode == 0 and word_b == "OK"
    return ok_a, ok_b, mapped_a, mapped_b
