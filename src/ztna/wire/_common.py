"""Small helpers shared by the wire codecs (docs/protocol.md, "Conventions").

Theory of operation: every decoder first turns its input into a flat, byte-indexed
`memoryview` with `as_view` so that `view[i]` is an int and slicing never copies. Addresses
travel as `[family 0x04|0x06][4|16 bytes]`; `pack_ip`/`unpack_ip` convert them. Text forms are
canonical `ipaddress` strings, and IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are folded to
plain IPv4 so one endpoint has one spelling everywhere (a dual-stack socket reports them).

Nothing here raises anything but `DecodeError` (peer bytes) or `UsageError` (our arguments).
"""

from __future__ import annotations

import ipaddress
from typing import Final

from ztna.errors import DecodeError, UsageError

Buffer = bytes | bytearray | memoryview

FAMILY_V4: Final = 0x04
FAMILY_V6: Final = 0x06
U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

# First bytes of real IP packets: IPv4 with a legal header length (IHL >= 5) and IPv6.
IPV4_FIRST_BYTES: Final = range(0x45, 0x50)
IPV6_FIRST_BYTES: Final = range(0x60, 0x70)
IP_FIRST_TABLE: Final = bytes(1 if (b in IPV4_FIRST_BYTES or b in IPV6_FIRST_BYTES) else 0
                         for b in range(256))


def as_view(data: Buffer) -> memoryview:
    """A 1-D unsigned-byte view of `data` (no copy). Non-buffers are the caller's bug."""
    try:
        view = memoryview(data)
    except TypeError:
        raise UsageError(f"expected bytes, bytearray or memoryview, got {type(data).__name__}") from None
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError:
            raise DecodeError("buffer is not C-contiguous") from None
    return view


def is_ip_first_byte(b: int) -> bool:
    """True if `b` can start an IPv4 (0x45-0x4F) or IPv6 (0x60-0x6F) packet."""
    return bool(IP_FIRST_TABLE[b])


def canonical_ip(ip: object) -> str:
    """Canonical text of an IP address; IPv4-mapped IPv6 becomes IPv4. UsageError if invalid."""
    if not isinstance(ip, str):
        raise UsageError(f"IP address must be a str, got {type(ip).__name__}")
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise UsageError(f"invalid IP address {ip!r}") from None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            # A zone cannot be carried on the wire, so refuse it rather than drop it silently.
            raise UsageError(f"scoped IPv6 address {ip!r} cannot be encoded")
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
    return str(addr)


def check_port(port: object, *, lo: int = 0, what: str = "port") -> int:
    if type(port) is not int or not lo <= port <= U16_MAX:
        raise UsageError(f"{what} must be an int in {lo}..65535, got {port!r}")
    return port


def check_uint(value: object, maximum: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise UsageError(f"{what} must be an int in 0..{maximum}, got {value!r}")
    return value


def pack_ip(ip: str) -> bytes:
    """`[family][packed address]` for a canonical IP text (as stored in our dataclasses)."""
    addr = ipaddress.ip_address(ip)
    family = FAMILY_V4 if addr.version == 4 else FAMILY_V6
    return bytes((family,)) + addr.packed


def ip_length(family: int) -> int:
    """Address length for a family byte; DecodeError for an unknown family."""
    if family == FAMILY_V4:
        return 4
    if family == FAMILY_V6:
        return 16
    raise DecodeError(f"unknown address family 0x{family:02x}")


def unpack_ip(family: int, raw: memoryview) -> str:
    """Canonical text for `raw` (already exactly 4 or 16 bytes for `family`)."""
    if family == FAMILY_V4:
        return str(ipaddress.IPv4Address(bytes(raw)))
    addr = ipaddress.IPv6Address(bytes(raw))
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)
