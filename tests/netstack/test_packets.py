"""Packet codecs: known vectors, checksum properties, ICMP builders, garbage rejection."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztna.errors import DecodeError
from ztna.netstack.checksum import checksum
from ztna.netstack.packets import (
    ACK,
    SYN,
    build_icmp_echo_reply,
    build_icmp_packet_too_big,
    build_icmp_port_unreachable,
    build_tcp_packet,
    build_udp_packet,
    bytes_to_ip,
    ip_to_bytes,
    may_send_icmp_error,
    parse_icmp,
    parse_ip,
    parse_tcp,
    parse_udp,
    verify_checksums,
)

V4A, V4B = ip_to_bytes("10.0.0.1"), ip_to_bytes("10.0.0.2")
V6A, V6B = ip_to_bytes("fd00::1"), ip_to_bytes("fd00::2")


def test_rfc1071_example() -> None:
    # RFC 1071 §3: words 0001 f203 f4f5 f6f7 sum to ddf2 → checksum 220d
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(b"\x00\x01\xf2") == 0xFFFF - ((0x0001 + 0xF200) % 0xFFFF)


def test_known_ipv4_udp_vector() -> None:
    # Computed by hand: IP words sum 0xd932 → 0x26cd; UDP pseudo-header 0x141e + UDP words
    # 0x8373 = 0x9791 → 0x686e.
    pkt = build_udp_packet(V4A, V4B, 1234, 5678, b"hi")
    assert pkt[:20].hex() == "4500001e00004000401126cd0a0000010a000002"
    assert pkt[20:].hex() == "04d2162e000a686e6869"
    assert verify_checksums(pkt)


def test_ip_helpers() -> None:
    assert bytes_to_ip(ip_to_bytes("fd00::2")) == "fd00::2"
    assert ip_to_bytes("1.2.3.4") == b"\x01\x02\x03\x04"


@given(v6=st.booleans(), sport=st.integers(0, 65535), dport=st.integers(0, 65535),
       payload=st.binary(max_size=1500))
def test_udp_roundtrip(v6: bool, sport: int, dport: int, payload: bytes) -> None:
    src, dst = (V6A, V6B) if v6 else (V4A, V4B)
    pkt = build_udp_packet(src, dst, sport, dport, payload)
    assert verify_checksums(pkt)
    assert pkt[(40 if v6 else 20) + 6:][:2] != b"\0\0"          # never "no checksum"
    ip = parse_ip(pkt + b"trailer")
    assert (ip.src, ip.dst, ip.proto, ip.ttl) == (src, dst, 17, 64)
    u = parse_udp(pkt + b"trailer", ip)
    assert (u.sport, u.dport, bytes(u.payload)) == (sport, dport, payload)


@given(v6=st.booleans(), seq=st.integers(0, 2**32 - 1), ack=st.integers(0, 2**32 - 1),
       flags=st.integers(0, 63), window=st.integers(0, 65535), payload=st.binary(max_size=1400),
       mss=st.none() | st.integers(1, 65535), wscale=st.none() | st.integers(0, 14),
       sack=st.booleans())
def test_tcp_roundtrip(v6: bool, seq: int, ack: int, flags: int, window: int, payload: bytes,
                       mss: int | None, wscale: int | None, sack: bool) -> None:
    src, dst = (V6A, V6B) if v6 else (V4A, V4B)
    pkt = build_tcp_packet(src, dst, 1, 2, seq=seq, ack=ack, flags=flags, window=window,
                           payload=payload, mss=mss, wscale=wscale, sack_permitted=sack)
    assert verify_checksums(pkt)
    bad = bytearray(pkt)
    bad[-1 if payload else -3] ^= 0x40
    assert not verify_checksums(bytes(bad))
    s = parse_tcp(pkt, parse_ip(pkt))
    assert (s.seq, s.ack, s.flags, s.window, s.mss, s.wscale, s.sack_permitted,
            bytes(s.payload)) == (seq, ack, flags, window, mss, wscale, sack, payload)


def test_ipv4_header_is_df_id0_and_checksummed() -> None:
    pkt = build_tcp_packet(V4A, V4B, 1, 2, seq=1, ack=2, flags=SYN | ACK, window=3, mss=1300)
    assert pkt[4:8] == b"\x00\x00\x40\x00" and pkt[8] == 64
    assert checksum(pkt[:20]) == 0


def test_ipv6_extension_headers_skipped_and_fragments_rejected() -> None:
    inner = build_udp_packet(V6A, V6B, 7, 8, b"data")
    udp = inner[40:]
    hop = bytes([17, 0]) + b"\0" * 6                  # hop-by-hop, 8 bytes, next = UDP
    hdr = struct.pack("!IHBB", 0x60000000, len(hop) + len(udp), 0, 64) + V6A + V6B
    ip = parse_ip(hdr + hop + udp)
    assert ip.proto == 17 and ip.header_len == 48
    assert bytes(parse_udp(hdr + hop + udp, ip).payload) == b"data"
    frag = bytes([17, 0, 0, 0, 0, 0, 0, 1])
    hdr = struct.pack("!IHBB", 0x60000000, len(frag) + len(udp), 44, 64) + V6A + V6B
    with pytest.raises(DecodeError):
        parse_ip(hdr + frag + udp)


def test_ipv4_fragment_rejected() -> None:
    pkt = bytearray(build_udp_packet(V4A, V4B, 1, 2, b"x"))
    pkt[6] = 0x20                                     # MF
    with pytest.raises(DecodeError):
        parse_ip(bytes(pkt))


@pytest.mark.parametrize("v6", [False, True])
def test_echo_reply(v6: bool) -> None:
    src, dst = (V6A, V6B) if v6 else (V4A, V4B)
    from ztna.netstack.packets import _icmp
    req = _icmp(src, dst, 128 if v6 else 8, 0, b"\x12\x34\x00\x07pingdata")
    assert verify_checksums(req)
    rep = build_icmp_echo_reply(req)
    assert rep is not None and verify_checksums(rep)
    ip = parse_ip(rep)
    assert (ip.src, ip.dst) == (dst, src)
    m = parse_icmp(rep, ip)
    assert (m.type, m.code, bytes(m.rest)) == (129 if v6 else 0, 0, b"\x12\x34\x00\x07pingdata")
    assert build_icmp_echo_reply(rep) is None         # a reply is not answered


@pytest.mark.parametrize("v6", [False, True])
def test_port_unreachable_quotes_and_stays_small(v6: bool) -> None:
    src, dst = (V6A, V6B) if v6 else (V4A, V4B)
    orig = build_udp_packet(src, dst, 5, 53, b"q" * 1400)
    err = build_icmp_port_unreachable(orig, src=dst)
    assert verify_checksums(err) and len(err) == (1280 if v6 else 576)
    ip = parse_ip(err)
    m = parse_icmp(err, ip)
    assert (ip.src, ip.dst, m.type, m.code) == (dst, src, *((1, 4) if v6 else (3, 3)))
    assert bytes(m.rest[4:]) == orig[:len(m.rest) - 4]
    assert may_send_icmp_error(orig) and not may_send_icmp_error(err)
    small = build_udp_packet(src, dst, 5, 53, b"q")
    assert bytes(parse_icmp(e := build_icmp_port_unreachable(small, src=dst),
                            parse_ip(e)).rest[4:]) == small


@pytest.mark.parametrize("v6", [False, True])
def test_packet_too_big(v6: bool) -> None:
    src, dst = (V6A, V6B) if v6 else (V4A, V4B)
    orig = build_tcp_packet(src, dst, 5, 80, seq=1, ack=1, flags=ACK, window=1, payload=b"x" * 1400)
    err = build_icmp_packet_too_big(orig, src=dst, mtu=1300)
    assert verify_checksums(err)
    m = parse_icmp(err, parse_ip(err))
    if v6:
        assert (m.type, m.code, int.from_bytes(m.rest[:4], "big")) == (2, 0, 1300)
    else:
        assert (m.type, m.code, int.from_bytes(m.rest[2:4], "big")) == (3, 4, 1300)


@settings(max_examples=500)
@given(data=st.binary(max_size=120))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    for blob in (data, b"\x45" + data, b"\x60" + data):
        try:
            ip = parse_ip(blob)
        except DecodeError:
            continue
        for fn in (parse_udp, parse_tcp, parse_icmp):
            try:
                fn(blob, ip)
            except DecodeError:
                pass


@given(cut=st.integers(0, 59))
def test_truncated_tcp_rejected(cut: int) -> None:
    pkt = build_tcp_packet(V4A, V4B, 1, 2, seq=1, ack=2, flags=SYN, window=3, mss=1300,
                           wscale=7, payload=b"abcdefghijklmnop")
    with pytest.raises(DecodeError):
        ip = parse_ip(pkt[:cut])
        parse_tcp(pkt[:cut], ip)
