"""Run inside a fresh network namespace: the Linux TCP stack talks to TcpEndpoint over a TUN.

Usage: python kernel_tun_peer.py  (prints "OK <up> <down>" on success). Used by
test_tcp_kernel.py under `ip netns exec`.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import socket
import struct
import subprocess
import threading
import time

from ztna.netstack.packets import PROTO_TCP, ip_to_bytes, parse_ip, parse_tcp
from ztna.netstack.tcp import TcpEndpoint

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
SIZE = 1 << 20


def main() -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"ztun0", IFF_TUN | IFF_NO_PI))
    for cmd in ("ip link set lo up", "ip addr add 10.99.0.1/24 dev ztun0",
                "ip link set ztun0 mtu 1400 up"):
        subprocess.run(cmd.split(), check=True)
    rng = random.Random(42)
    up, down = rng.randbytes(SIZE), rng.randbytes(SIZE)
    result: dict[str, bytes] = {}

    def client() -> None:
        s = socket.create_connection(("10.99.0.2", 80), timeout=30)
        sender = threading.Thread(target=lambda: (s.sendall(up), s.shutdown(socket.SHUT_WR)))
        sender.start()
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        sender.join()
        s.close()
        result["down"] = b"".join(chunks)

    t = threading.Thread(target=client)
    t.start()
    ep: TcpEndpoint | None = None
    got = bytearray()
    off = 0
    start = time.monotonic()
    while time.monotonic() - start < 60:
        now = time.monotonic()
        timeout = 0.05
        if ep is not None and (d := ep.next_deadline()) is not None:
            timeout = max(0.0, min(timeout, d - now))
        r, _, _ = select.select([fd], [], [], timeout)
        now = time.monotonic()
        for _ in range(64 if r else 0):
            try:
                pkt = os.read(fd, 65536)
            except BlockingIOError:
                break
            ip = parse_ip(pkt)
            if ip.proto != PROTO_TCP:
                continue
            seg = parse_tcp(pkt, ip)
            if ep is None:
                ep = TcpEndpoint(local_ip=ip_to_bytes("10.99.0.2"), local_port=80,
                                 remote_ip=ip.src, remote_port=seg.sport, isn=rng.getrandbits(32),
                                 mss=1360, now=now)
                ep.on_segment(seg, now=now)
                ep.accept(now=now)
            else:
                ep.on_segment(seg, now=now)
            if not select.select([fd], [], [], 0)[0]:
                break
        if ep is None:
            continue
        got += ep.read()
        if off < SIZE and ep.established:
            off += ep.send(memoryview(down)[off:off + 65536])
            if off == SIZE:
                ep.close(now=now)
        if (d := ep.next_deadline()) is not None and d <= now:
            ep.on_timer(now=now)
        for out in ep.poll(now=now, budget=64):
            os.write(fd, out)
        if ep.closed and not t.is_alive():
            break
    t.join(5)
    ok = bytes(got) == up and result.get("down") == down
    print("OK" if ok else "FAIL", len(got), len(result.get("down", b"")), ep and ep.state)


if __name__ == "__main__":
    main()
