"""SOCKS5 UDP ASSOCIATE (RFC 1928 §7) through real processes on loopback: `ztna
intermediate`, `ztna connector` with a UDP echo backend, `ztna agent --socks` in userspace
mode, and a small standard SOCKS5 UDP client written here from the RFC.

Checked: the echo is byte-exact for several sizes up to the largest that fits the tunnel,
the reply's header names the service's virtual IP:port, one byte more is dropped (counted),
fragments, non-service destinations and datagrams from another port or IP are dropped
(counted),
and the association dies with its TCP control connection."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from agent_util import wait_for  # noqa: E402
from loopback_procs import UdpEcho, loopback_world  # noqa: E402

from ztna.certs import init_pki

VIP, VIP6, VPORT = "10.100.0.2", "fd00:100::2", 53


class Socks5UdpClient:
    """RFC 1928: greeting (no authentication), UDP ASSOCIATE, then datagrams with the
    RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT header to the relay address the server named."""

    def __init__(self, host: str, port: int) -> None:
        self.tcp = socket.create_connection((host, port), timeout=5)
        self.tcp.sendall(b"\x05\x01\x00")
        assert self._recv(2) == b"\x05\x00"
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(3)
        # DST.ADDR/DST.PORT: where we will send from (RFC: zeros if not known yet).
        self.tcp.sendall(b"\x05\x03\x00\x01" + bytes(4) + struct.pack("!H", 0))
        ver, rep, _, atyp = self._recv(4)
        assert (ver, rep) == (5, 0), f"UDP ASSOCIATE refused: REP={rep}"
        addr = self._recv(4 if atyp == 1 else 16)
        (port,) = struct.unpack("!H", self._recv(2))
        self.relay = (str(ipaddress.ip_address(addr)), port)

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.tcp.recv(n - len(buf))
            assert chunk, "server closed the control connection"
            buf += chunk
        return buf

    @staticmethod
    def header(host: str, port: int, frag: int = 0) -> bytes:
        ip = ipaddress.ip_address(host)
        return b"\x00\x00" + bytes((frag, 1 if ip.version == 4 else 4)) + ip.packed + struct.pack("!H", port)

    def send(self, host: str, port: int, data: bytes, frag: int = 0) -> None:
        self.udp.sendto(self.header(host, port, frag) + data, self.relay)

    def recv(self) -> tuple[str, int, bytes]:
        data, src = self.udp.recvfrom(65535)
        assert src[:2] == self.relay, src
        assert data[:3] == b"\x00\x00\x00", data[:3]
        assert data[3] in (1, 4), f"ATYP {data[3]}"
        n = 4 if data[3] == 1 else 16
        host = str(ipaddress.ip_address(data[4:4 + n]))
        (port,) = struct.unpack("!H", data[4 + n:6 + n])
        return host, port, data[6 + n:]

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()


def _nothing_comes(sock: socket.socket, wait: float = 1.0) -> bool:
    sock.settimeout(wait)
    try:
        sock.recvfrom(65535)
    except TimeoutError:
        return True
    except ConnectionRefusedError:   # ICMP port unreachable: the relay socket is gone
        return True
    return False


def test_socks5_udp_associate_echo_through_tunnel(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["web"])
    echo = UdpEcho()
    try:
        with loopback_world(tmp_path, pki, p2p=False, agent_args=["--socks", "127.0.0.1:0"],
                            connector_services=[f"web=10.100.0.2,fd00:100::2;udp:{VPORT}=127.0.0.1:{echo.port}"]) as w:
            snap = w.snap()
            socks = next(x for x in snap["userspace"]["listeners"] if x.startswith("socks5 "))
            sport = int(socks.split(" ")[1].rsplit(":", 1)[1])
            web = next(s for s in snap["services"] if s["id"] == "web")
            largest = web["max_packet"] - 20 - 8          # IPv4 + UDP headers inside the tunnel
            assert largest > 1000

            c = Socks5UdpClient("127.0.0.1", sport)
            assert c.relay[0] == "127.0.0.1" and c.relay[1] not in (0, sport)
            # The first datagram may race the Connector's flow set-up: retry until one echoes.
            for _ in range(20):
                c.send(VIP, VPORT, b"warm-up")
                try:
                    assert c.recv() == (VIP, VPORT, b"warm-up")
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("no echo through the association\n" + w.logs())
            for size in (0, 1, 100, 1000, largest - 1, largest):
                payload = os.urandom(size)
                c.send(VIP, VPORT, payload)
                assert c.recv() == (VIP, VPORT, payload), size

            # The service's IPv6 virtual IP: replies carry ATYP 4 and that address.
            for size in (5, largest - 20):                    # IPv6 header is 20 bytes longer
                payload = os.urandom(size)
                c.send(VIP6, VPORT, payload)
                assert c.recv() == (VIP6, VPORT, payload), size

            before = w.snap()["userspace"]
            c.send(VIP, VPORT, os.urandom(largest + 1))            # does not fit: dropped
            c.send(VIP, VPORT, b"fragment", frag=1)               # we do not reassemble
            c.send("10.9.9.9", VPORT, b"not a service")            # no open proxy
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other.bind(("127.0.0.1", 0))                           # not the client's port
            other.sendto(c.header(VIP, VPORT) + b"intruder", c.relay)
            stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            stranger.bind(("127.0.0.2", 0))                        # not the client's IP
            stranger.sendto(c.header(VIP, VPORT) + b"stranger", c.relay)
            assert _nothing_comes(c.udp) and _nothing_comes(other, 0.2) and _nothing_comes(stranger, 0.2)
            after = w.snap()["userspace"]
            for key in ("udp_dropped_too_big", "socks_udp_dropped_frag", "socks_udp_refused"):
                assert after[key] == before[key] + 1, (key, before, after)
            assert after["socks_udp_dropped_foreign"] == before["socks_udp_dropped_foreign"] + 2
            stranger.close()
            assert after["socks_udp_active"] == 1
            received = echo.received

            relay = c.relay
            c.tcp.close()                                          # ends the association
            wait_for(lambda: w.snap()["userspace"]["socks_udp_active"] == 0, 10, "association closed")
            c.udp.sendto(c.header(VIP, VPORT) + b"after close", relay)
            assert _nothing_comes(c.udp)
            time.sleep(0.2)
            assert echo.received == received                      # nothing reached the backend
            c.udp.close()
            other.close()
            assert w.procs["agent"].poll() is None
    finally:
        echo.close()


@pytest.mark.parametrize("cmd", [2])   # BIND stays unsupported: REP=07
def test_socks5_bind_still_refused(tmp_path: Path, cmd: int) -> None:
    import asyncio

    from ztna.agent.agent import Agent
    from ztna.agent.config import AgentOptions, parse_service
    from ztna.quic.config import TlsFiles

    pki = tmp_path / "pki"
    init_pki(pki, ["web"])

    async def case() -> bytes:
        agent = Agent(AgentOptions(intermediate=("127.0.0.1", 9), tls=TlsFiles.from_dir(pki, "agent"),
                                   services=(parse_service("web=10.100.0.2"),), mode="userspace",
                                   name="b", state_dir=tmp_path / "state", socks=("127.0.0.1", 0)))
        await agent.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", agent.userspace.bound_port("socks5"))
            w.write(b"\x05\x01\x00")
            assert await r.readexactly(2) == b"\x05\x00"
            w.write(bytes((5, cmd, 0, 1)) + bytes(4) + b"\x00\x00")
            reply = await asyncio.wait_for(r.readexactly(10), 5)
            w.close()
            return reply
        finally:
            await agent.stop()

    assert asyncio.run(case())[1] == 0x07
