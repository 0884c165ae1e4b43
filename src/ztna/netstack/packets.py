"""Parse and build whole IPv4/IPv6 packets carrying UDP, TCP and ICMP (the Connector's hot path).

Theory of operation:

* Parsers take the complete IP packet (`bytes`, `bytearray` or `memoryview`) and never copy
  payloads: `UdpDatagram.payload`, `TcpSegment.payload` and `IcmpMessage.rest` are
  memoryviews into the caller's buffer. Every length is validated; anything truncated or
  inconsistent raises `DecodeError` and nothing else. Bytes after the IP total length
  (link padding) are ignored. Checksums are *not* verified by the parsers (the tunnel is
  authenticated by QUIC; `verify_checksums` exists for tests and for drivers that want it).
* IPv6 extension headers hop-by-hop (0), routing (43), destination options (60) and AH (51)
  are skipped; `IpHeader.proto` is the upper-layer protocol. Fragments (IPv4 MF/offset, IPv6
  header 44) raise `DecodeError`: the Agent's TUN never fragments below the tunnel MTU, and
  reassembly would be unbounded state.
* Builders return complete packets with correct IPv4 header checksums and L4 checksums over
  the pseudo-header. IPv4: DF set, ID 0, TTL 64. IPv6: hop limit 64, no flow label.
* Addresses are packed bytes (4 or 16) everywhere; `ip_to_bytes`/`bytes_to_ip` convert.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.netstack.checksum import finish, ones_sum, pseudo_header_sum

__all__ = [
    "FIN", "SYN", "RST", "PSH", "ACK", "URG",
    "PROTO_ICMP", "PROTO_TCP", "PROTO_UDP", "PROTO_ICMPV6",
    "IpHeader", "UdpDatagram", "TcpSegment", "IcmpMessage",
    "ip_to_bytes", "bytes_to_ip", "parse_ip", "parse_udp", "parse_tcp", "parse_icmp",
    "build_ip_packet", "build_udp_packet", "build_tcp_packet", "build_icmp_echo_reply",
    "build_icmp_port_unreachable", "build_icmp_packet_too_big", "may_send_icmp_error",
    "verify_checksums",
]

FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58

DEFAULT_TTL: Final = 64
IPV4_MIN_MTU_ICMP: Final = 576    # RFC 1812 §4.3.2.3: ICMPv4 errors stay within 576 bytes
IPV6_MIN_MTU: Final = 1280        # RFC 4443 §2.4(c): ICMPv6 errors stay within 1280 bytes

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_TCP = struct.Struct("!HHIIBBHHH")
_ICMP_HDR = struct.Struct("!BBH")
_SACK_BLOCK = struct.Struct("!II")
_V6_EXT_SKIP: Final = frozenset({0, 43, 60, 51})
_V6_FRAGMENT: Final = 44


@dataclass(frozen=True, slots=True)
class IpHeader:
    version: int
    src: bytes
    dst: bytes
    proto: int          # IPv6: upper-layer protocol after extension headers
    header_len: int     # IPv6: 40 + extension headers
    total_len: int      # bytes of the packet that belong to it (trailing bytes ignored)
    ttl: int            # IPv6: hop limit


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    sport: int
    dport: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class TcpSegment:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    mss: int | None
    wscale: int | None
    sack_permitted: bool
    payload: memoryview
    sack_blocks: tuple[tuple[int, int], ...] = ()   # RFC 2018 (left, right) 32-bit edges

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies: payload plus one for SYN and for FIN."""
        return len(self.payload) + (self.flags & SYN != 0) + (self.flags & FIN != 0)


@dataclass(frozen=True, slots=True)
class IcmpMessage:
    type: int
    code: int
    rest: memoryview    # everything after type, code and checksum


def ip_to_bytes(address: str) -> bytes:
    try:
        return ipaddress.ip_address(address).packed
    except ValueError as exc:
        raise UsageError(f"not an IP address: {address!r}") from exc


def bytes_to_ip(packed: bytes) -> str:
    if len(packed) not in (4, 16):
        raise UsageError(f"packed address must be 4 or 16 bytes, not {len(packed)}")
    return str(ipaddress.ip_address(bytes(packed)))


# --------------------------------------------------------------------------- parsing

def parse_ip(data: bytes | bytearray | memoryview) -> IpHeader:
    n = len(data)
    if n < 1:
        raise DecodeError("empty IP packet")
    version = data[0] >> 4
    if version == 4:
        if n < 20:
            raise DecodeError("truncated IPv4 header")
        vihl, _tos, total, _ident, frag, ttl, proto, _ck, src, dst = _IPV4.unpack_from(data)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or total < ihl or total > n:
            raise DecodeError("bad IPv4 header or total length")
        if frag & 0x3FFF:
            raise DecodeError("IPv4 fragment")
        return IpHeader(4, src, dst, proto, ihl, total, ttl)
    if version == 6:
        if n < 40:
            raise DecodeError("truncated IPv6 header")
        _vtcfl, plen, nxt, hlim, src, dst = _IPV6.unpack_from(data)
        total = 40 + plen
        if plen == 0 or total > n:
            raise DecodeError("bad IPv6 payload length (jumbograms unsupported)")
        off = 40
        while nxt in _V6_EXT_SKIP:
            if off + 2 > total:
                raise DecodeError("truncated IPv6 extension header")
            ext_len = (data[off + 1] + 2) * 4 if nxt == 51 else (data[off + 1] + 1) * 8
            nxt = data[off]
            off += ext_len
            if off > total:
                raise DecodeError("truncated IPv6 extension header")
        if nxt == _V6_FRAGMENT:
            raise DecodeError("IPv6 fragment")
        return IpHeader(6, src, dst, nxt, off, total, hlim)
    raise DecodeError(f"IP version {version}")


def _l4(data: bytes | bytearray | memoryview, ip: IpHeader) -> memoryview:
    return memoryview(data)[ip.header_len:ip.total_len]


def parse_udp(data: bytes | bytearray | memoryview, ip: IpHeader) -> UdpDatagram:
    l4 = _l4(data, ip)
    if len(l4) < 8:
        raise DecodeError("truncated UDP header")
    sport, dport, length, _ck = _UDP.unpack_from(l4)
    if length < 8 or length > len(l4):
        raise DecodeError("bad UDP length")
    return UdpDatagram(sport, dport, l4[8:length])


def parse_tcp(data: bytes | bytearray | memoryview, ip: IpHeader) -> TcpSegment:
    l4 = _l4(data, ip)
    if len(l4) < 20:
        raise DecodeError("truncated TCP header")
    sport, dport, seq, ack, off, flags, window, _ck, _urg = _TCP.unpack_from(l4)
    doff = (off >> 4) * 4
    if doff < 20 or doff > len(l4):
        raise DecodeError("bad TCP data offset")
    mss = wscale = None
    sack_ok = False
    blocks: tuple[tuple[int, int], ...] = ()
    i = 20
    while i < doff:
        kind = l4[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= doff or l4[i + 1] < 2 or i + l4[i + 1] > doff:
            raise DecodeError("bad TCP option length")
        olen = l4[i + 1]
        if kind == 2 and olen == 4:
            mss = (l4[i + 2] << 8) | l4[i + 3]
        elif kind == 3 and olen == 3:
            wscale = min(l4[i + 2], 14)     # RFC 7323 §2.3: treat >14 as 14
        elif kind == 4 and olen == 2:
            sack_ok = True
        elif kind == 5 and olen in (10, 18, 26, 34):
            blocks = tuple(_SACK_BLOCK.unpack_from(l4, j) for j in range(i + 2, i + olen, 8))
        i += olen
    return TcpSegment(sport, dport, seq, ack, flags & 0x3F, window, mss, wscale, sack_ok,
                      l4[doff:], blocks)


def parse_icmp(data: bytes | bytearray | memoryview, ip: IpHeader) -> IcmpMessage:
    if ip.proto not in (PROTO_ICMP, PROTO_ICMPV6):
        raise DecodeError("not ICMP")
    l4 = _l4(data, ip)
    if len(l4) < 4:
        raise DecodeError("truncated ICMP header")
    return IcmpMessage(l4[0], l4[1], l4[4:])


# --------------------------------------------------------------------------- building

def _ip_header(src: bytes, dst: bytes, proto: int, l4_len: int, ttl: int) -> bytes:
    if len(src) == 4 and len(dst) == 4:
        total = 20 + l4_len
        if total > 0xFFFF:
            raise UsageError("IPv4 packet too large")
        # DF set, ID 0 (RFC 6864 allows ID 0 for atomic datagrams).
        hdr = _IPV4.pack(0x45, 0, total, 0, 0x4000, ttl, proto, 0, src, dst)
        ck = finish(int.from_bytes(hdr, "big"))
        return hdr[:10] + ck.to_bytes(2, "big") + hdr[12:]
    if len(src) == 16 and len(dst) == 16:
        if l4_len > 0xFFFF:
            raise UsageError("IPv6 payload too large")
        return _IPV6.pack(0x60000000, l4_len, proto, ttl, src, dst)
    raise UsageError("src and dst must both be 4 or both be 16 packed bytes")


def _with_l4_checksum(src: bytes, dst: bytes, proto: int, l4: bytearray, ck_off: int,
                      zero_as_ffff: bool) -> bytearray:
    total = pseudo_header_sum(src, dst, proto, len(l4)) + ones_sum(l4)
    ck = finish(total)
    if ck == 0 and zero_as_ffff:
        ck = 0xFFFF     # RFC 768: a computed 0 is sent as all ones (0 means "no checksum")
    l4[ck_off] = ck >> 8
    l4[ck_off + 1] = ck & 0xFF
    return l4


def build_ip_packet(src: bytes, dst: bytes, proto: int, l4: bytes | bytearray,
                    *, ttl: int = DEFAULT_TTL) -> bytes:
    """IP header + `l4` (whose checksum the caller already filled in)."""
    return _ip_header(src, dst, proto, len(l4), ttl) + l4


def build_udp_packet(src: bytes, dst: bytes, sport: int, dport: int,
                     payload: bytes | bytearray | memoryview, *, ttl: int = DEFAULT_TTL) -> bytes:
    length = 8 + len(payload)
    l4 = bytearray(_UDP.pack(sport, dport, length if length <= 0xFFFF else 0, 0))
    l4 += payload
    _with_l4_checksum(src, dst, PROTO_UDP, l4, 6, True)
    return _ip_header(src, dst, PROTO_UDP, length, ttl) + l4


def _tcp_options(mss: int | None, wscale: int | None, sack_permitted: bool,
                 sack_blocks: tuple[tuple[int, int], ...] = ()) -> bytes:
    opts = b""
    if mss is not None:
        opts += b"\x02\x04" + mss.to_bytes(2, "big")
    if wscale is not None:
        opts += b"\x01\x03\x03" + bytes((wscale,))
    if sack_permitted:
        opts += b"\x01\x01\x04\x02"
    if sack_blocks:
        opts += b"\x01\x01\x05" + bytes((2 + 8 * len(sack_blocks),)) + b"".join(
            _SACK_BLOCK.pack(left & 0xFFFFFFFF, right & 0xFFFFFFFF) for left, right in sack_blocks)
    return opts


def build_tcp_packet(src: bytes, dst: bytes, sport: int, dport: int, *, seq: int, ack: int,
                     flags: int, window: int, payload: bytes | bytearray | memoryview = b"",
                     mss: int | None = None, wscale: int | None = None,
                     sack_permitted: bool = False,
                     sack_blocks: tuple[tuple[int, int], ...] = (),
                     ttl: int = DEFAULT_TTL) -> bytes:
    if len(sack_blocks) > 4:
        raise UsageError("at most 4 SACK blocks fit the TCP options")
    opts = _tcp_options(mss, wscale, sack_permitted, sack_blocks) if (
        mss or wscale is not None or sack_permitted or sack_blocks) else b""
    doff = 20 + len(opts)
    l4 = bytearray(_TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, doff << 2,
                             flags, window, 0, 0))
    l4 += opts
    l4 += payload
    _with_l4_checksum(src, dst, PROTO_TCP, l4, 16, False)
    return _ip_header(src, dst, PROTO_TCP, len(l4), ttl) + l4


def _icmp(src: bytes, dst: bytes, icmp_type: int, code: int, body: bytes | bytearray | memoryview
          ) -> bytes:
    """ICMPv4 (no pseudo-header) or ICMPv6 (with pseudo-header, RFC 4443 §2.3) packet."""
    l4 = bytearray(_ICMP_HDR.pack(icmp_type, code, 0))
    l4 += body
    if len(src) == 16:
        _with_l4_checksum(src, dst, PROTO_ICMPV6, l4, 2, False)
        proto = PROTO_ICMPV6
    else:
        ck = finish(ones_sum(l4))
        l4[2], l4[3] = ck >> 8, ck & 0xFF
        proto = PROTO_ICMP
    return _ip_header(src, dst, proto, len(l4), DEFAULT_TTL) + l4


def build_icmp_echo_reply(request_packet: bytes | bytearray | memoryview) -> bytes | None:
    """Echo reply for an echo request (v4 type 8 / v6 type 128), else None.

    The reply swaps the addresses and keeps identifier, sequence number and data.
    """
    try:
        ip = parse_ip(request_packet)
        msg = parse_icmp(request_packet, ip)
    except DecodeError:
        return None
    if len(msg.rest) < 4 or msg.code != 0:
        return None
    if ip.version == 4 and ip.proto == PROTO_ICMP and msg.type == 8:
        return _icmp(ip.dst, ip.src, 0, 0, msg.rest)
    if ip.version == 6 and ip.proto == PROTO_ICMPV6 and msg.type == 128:
        return _icmp(ip.dst, ip.src, 129, 0, msg.rest)
    return None


def may_send_icmp_error(original_packet: bytes | bytearray | memoryview) -> bool:
    """RFC 1122 §3.2.2 / RFC 4443 §2.4(e): never answer an ICMP error or a multicast."""
    try:
        ip = parse_ip(original_packet)
    except DecodeError:
        return False
    if ip.version == 4:
        if ip.dst[0] >= 224 or ip.src[0] >= 224 or ip.src == b"\0\0\0\0":
            return False
        if ip.proto == PROTO_ICMP:
            t = original_packet[ip.header_len] if ip.total_len > ip.header_len else 0
            return t in (0, 8, 13, 14)   # only informational messages may be answered
        return True
    if ip.dst[0] == 0xFF or ip.src[0] == 0xFF or ip.src == bytes(16):
        return False
    if ip.proto == PROTO_ICMPV6:
        t = original_packet[ip.header_len] if ip.total_len > ip.header_len else 0
        return t >= 128
    return True


def _quote(original: bytes | bytearray | memoryview, limit: int) -> memoryview:
    ip = parse_ip(original)
    return memoryview(original)[:min(ip.total_len, limit)]


def build_icmp_port_unreachable(original_packet: bytes | bytearray | memoryview, *,
                                src: bytes) -> bytes:
    """Destination unreachable / port (v4 3/3, v6 1/4) to the original's source.

    Quotes as much of the original as fits in 576 (v4, RFC 1812) / 1280 (v6) bytes.
    Raises DecodeError if the original is not a parsable IP packet.
    """
    ip = parse_ip(original_packet)
    if ip.version == 4:
        return _icmp(src, ip.src, 3, 3, b"\0\0\0\0" + _quote(original_packet,
                                                              IPV4_MIN_MTU_ICMP - 28))
    return _icmp(src, ip.src, 1, 4, b"\0\0\0\0" + _quote(original_packet, IPV6_MIN_MTU - 48))


def build_icmp_packet_too_big(original_packet: bytes | bytearray | memoryview, *, src: bytes,
                              mtu: int) -> bytes:
    """v4 "fragmentation needed" (3/4, RFC 1191 next-hop MTU) or v6 Packet Too Big (2/0)."""
    ip = parse_ip(original_packet)
    if ip.version == 4:
        body = b"\0\0" + (mtu & 0xFFFF).to_bytes(2, "big")
        return _icmp(src, ip.src, 3, 4, body + _quote(original_packet, IPV4_MIN_MTU_ICMP - 28))
    body = (mtu & 0xFFFFFFFF).to_bytes(4, "big")
    return _icmp(src, ip.src, 2, 0, body + _quote(original_packet, IPV6_MIN_MTU - 48))


def verify_checksums(packet: bytes | bytearray | memoryview) -> bool:
    """True if the IPv4 header checksum and the UDP/TCP/ICMP checksum are correct."""
    try:
        ip = parse_ip(packet)
    except DecodeError:
        return False
    mv = memoryview(packet)
    if ip.version == 4 and ones_sum(mv[:ip.header_len]) != 0:
        return False
    l4 = mv[ip.header_len:ip.total_len]
    if ip.proto == PROTO_ICMP and ip.version == 4:
        return ones_sum(l4) == 0
    if ip.proto in (PROTO_TCP, PROTO_UDP, PROTO_ICMPV6):
        if ip.proto == PROTO_UDP and len(l4) >= 8 and l4[6] == 0 and l4[7] == 0:
            return ip.version == 4   # v4 UDP checksum 0 means "none"; forbidden on v6
        total = pseudo_header_sum(ip.src, ip.dst, ip.proto, len(l4)) + ones_sum(l4)
        return total % 0xFFFF == 0
    return True
