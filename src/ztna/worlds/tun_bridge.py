"""Minimal TUN Agent for tests (run inside a namespace as root; replaced later by the real Agent).

Usage: python -m ztna.worlds.tun_bridge HOST PORT PKI SERVICE=CIDR[,CIDR] ...
Creates TUN `zt0` (100.64.0.1), routes each service's prefixes to it, connects to the
Intermediate as an Agent, registers every service, wraps TUN packets in 0x2F and writes
received bare IP packets back to the TUN. MTU = live max DATAGRAM payload − (7 + len(id))
(the wave-2 rule). Prints "READY <mtu>" once registered.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import struct
import subprocess
import sys
from pathlib import Path

from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.wire import ControlMessage, Ping, Register, RegistrationAck, Role, encode_control

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


class Bridge(ConnectionHandler):
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.acks: set[str] = set()

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        if isinstance(msg, RegistrationAck):
            self.acks.add(msg.service_id)

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        if data and data[0] >= 0x45:
            try:
                os.write(self.fd, data)
            except OSError:
                pass


async def main() -> None:
    host, port, pki = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    routes: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
    for spec in sys.argv[4:]:
        sid, _, cidrs = spec.partition("=")
        routes += [(ipaddress.ip_network(c), sid) for c in cidrs.split(",")]
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"zt0", IFF_TUN | IFF_NO_PI))
    ep = QuicEndpoint(bind_udp("0.0.0.0", 0))
    cfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "agent"),
                             server_name="localhost")
    bridge = Bridge(fd)
    conn = ep.connect((host, port), cfg, bridge)
    conn.send_control(encode_control(Ping(id=1)))
    await asyncio.wait_for(conn.wait_handshake(), 10)
    services = sorted({s for _, s in routes})
    for s in services:
        conn.send_control(encode_control(Register(role=Role.AGENT, service_id=s)))
    while bridge.acks != set(services):
        await asyncio.sleep(0.02)
    mtu = conn.max_datagram_payload() - (7 + max(len(s) for s in services))
    run = lambda c: subprocess.run(c.split(), check=True)  # noqa: E731
    run("ip addr add 100.64.0.1/32 dev zt0")
    run("ip -6 addr add fd00:64::1/128 dev zt0 nodad")
    run(f"ip link set zt0 mtu {mtu} up")
    for net, _ in routes:
        run(f"ip {'-6 ' if net.version == 6 else ''}route add {net} dev zt0")
    headers = {s: bytes((0x2F, len(s))) + s.encode() for s in services}
    v4 = [(int(n.network_address), int(n.netmask), s) for n, s in routes if n.version == 4]
    loop = asyncio.get_running_loop()

    def readable() -> None:
        for _ in range(256):
            try:
                pkt = os.read(fd, 65535)
            except BlockingIOError:
                return
            if pkt[0] >> 4 == 4:
                dst = int.from_bytes(pkt[16:20], "big")
                sid = next((s for a, m, s in v4 if dst & m == a), None)
            else:
                d6 = ipaddress.ip_address(pkt[24:40])
                sid = next((s for n, s in routes if n.version == 6 and d6 in n), None)
            if sid is None:
                continue
            # Like the real Agent (ztna.agent.session.send): hand every packet to the
            # connection's bounded DATAGRAM queue (drop-oldest); dropping whenever the
            # budget is 0 turned every burst of the kernel's TCP into losses.
            try:
                conn.send_datagram(headers[sid] + pkt)
            except Exception:
                pass

    loop.add_reader(fd, readable)
    print(f"READY {mtu}", flush=True)
    while not conn.closed:
        await asyncio.sleep(1)
        conn.ping()


if __name__ == "__main__":
    asyncio.run(main())
