"""QUIC Address Discovery, type 0x01 (docs/protocol.md §3.1).

The Intermediate (and a Connector's P2P listener) tells a peer which source `ip:port` it saw,
so the peer learns its server-reflexive address for hole punching.

Layout (8 or 20 bytes, exact; trailing bytes are an error):

    [0x01][version 0x04|0x06][address 4|16][port u16 BE]

The same message minus its type byte (`encode_qad_body`) is the body of control frame 0x01.
Unlike the original (IPv4 only, `::ffff:` mapping by the sender), IPv6 is carried natively and
an IPv4-mapped IPv6 address is normalised to IPv4 by `ObservedAddress` itself, so a mapped
address on the wire decodes to the same value as the plain IPv4 form.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.wire._common import (
    FAMILY_V4,
    FAMILY_V6,
    Buffer,
    as_view,
    canonical_ip,
    check_port,
    pack_ip,
    unpack_ip,
)

__all__ = [
    "QAD_TYPE",
    "ObservedAddress",
    "decode_qad",
    "decode_qad_body",
    "encode_qad",
    "encode_qad_body",
]

QAD_TYPE: Final = 0x01
_PORT: Final = struct.Struct(">H")
_BODY_LEN: Final = {FAMILY_V4: 1 + 4 + 2, FAMILY_V6: 1 + 16 + 2}


@dataclass(frozen=True, slots=True)
class ObservedAddress:
    """An `ip:port` as seen by the peer. `ip` is canonical text; mapped IPv6 becomes IPv4."""

    ip: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip", canonical_ip(self.ip))
        check_port(self.port)


def encode_qad_body(addr: ObservedAddress) -> bytes:
    """`[version][address][port]` (no type byte)."""
    if not isinstance(addr, ObservedAddress):
        raise UsageError(f"expected ObservedAddress, got {type(addr).__name__}")
    return pack_ip(addr.ip) + _PORT.pack(addr.port)


def encode_qad(addr: ObservedAddress) -> bytes:
    return bytes((QAD_TYPE,)) + encode_qad_body(addr)


def decode_qad_body(data: Buffer) -> ObservedAddress:
    view = as_view(data)
    if not view:
        raise DecodeError("empty QAD body")
    version = view[0]
    expected = _BODY_LEN.get(version)
    if expected is None:
        raise DecodeError(f"QAD: unknown address version 0x{version:02x}")
    if len(view) != expected:
        raise DecodeError(f"QAD: body is {len(view)} bytes, expected {expected}")
    ip = unpack_ip(version, view[1 : expected - 2])
    (port,) = _PORT.unpack_from(view, expected - 2)
    return ObservedAddress(ip, port)


def decode_qad(data: Buffer) -> ObservedAddress:
    view = as_view(data)
    if not view or view[0] != QAD_TYPE:
        raise DecodeError("not a QAD message (type 0x01)")
    return decode_qad_body(view[1:])
