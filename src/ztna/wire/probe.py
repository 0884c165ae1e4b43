"""P2P connectivity-check probes: raw UDP on the P2P sockets (docs/protocol.md §6).

Probes share a UDP socket with QUIC, so their first byte lies in 0x00-0x3F: every QUIC packet
has the fixed bit 0x40 set (RFC 9000 §17; RFC 9443 demultiplexing), so `is_probe` needs one byte.

    Request   [0x21][0x01][session u64 BE][txid 12][flags u8][mac 16]                39 bytes
    Response  [0x22][0x01][session u64 BE][txid 12][family][mapped ip 4|16][port u16][mac 16]
              45 bytes (IPv4) / 57 bytes (IPv6)

flags: bit 0 = nominate, bit 1 = sender is controlling; other bits must be zero.
mapped = the request's source address as the responder saw it (server-reflexive discovery).
mac = HMAC-SHA256(key, every preceding byte)[:16], key = the 32-byte session key from
`PunchStart.key`. The receiver peeks the session with `probe_session_of` to pick the key,
then `decode_probe` checks structure first (DecodeError) and the mac second (ProbeAuthError),
in constant time, before any field is trusted.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.wire._common import (
    U64_MAX,
    Buffer,
    as_view,
    canonical_ip,
    check_port,
    check_uint,
    ip_length,
    pack_ip,
    unpack_ip,
)

__all__ = [
    "PROBE_KEY_LEN",
    "PROBE_MAC_LEN",
    "PROBE_REQUEST",
    "PROBE_RESPONSE",
    "PROBE_VERSION",
    "ProbeAuthError",
    "ProbeRequest",
    "ProbeResponse",
    "decode_probe",
    "encode_probe",
    "is_probe",
    "probe_session_of",
]

PROBE_REQUEST: Final = 0x21
PROBE_RESPONSE: Final = 0x22
PROBE_VERSION: Final = 1
PROBE_KEY_LEN: Final = 32
PROBE_MAC_LEN: Final = 16
TXID_LEN: Final = 12
FLAG_NOMINATE: Final = 0x01
FLAG_CONTROLLING: Final = 0x02

_HEAD: Final = struct.Struct(">BBQ")  # type, version, session
_REQUEST_LEN: Final = 10 + TXID_LEN + 1 + PROBE_MAC_LEN  # 39
_PORT: Final = struct.Struct(">H")


class ProbeAuthError(DecodeError):
    """A well-formed probe whose mac does not match the session key."""


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    session: int
    txid: bytes
    nominate: bool
    controlling: bool

    def __post_init__(self) -> None:
        check_uint(self.session, U64_MAX, "session")
        _check_txid(self)
        if type(self.nominate) is not bool or type(self.controlling) is not bool:
            raise UsageError("nominate and controlling must be bools")


@dataclass(frozen=True, slots=True)
class ProbeResponse:
    session: int
    txid: bytes
    mapped_ip: str
    mapped_port: int

    def __post_init__(self) -> None:
        check_uint(self.session, U64_MAX, "session")
        _check_txid(self)
        object.__setattr__(self, "mapped_ip", canonical_ip(self.mapped_ip))
        check_port(self.mapped_port, what="mapped_port")


def _check_txid(msg: ProbeRequest | ProbeResponse) -> None:
    txid = msg.txid
    if not isinstance(txid, (bytes, bytearray, memoryview)) or len(txid) != TXID_LEN:
        raise UsageError(f"txid must be {TXID_LEN} bytes")
    object.__setattr__(msg, "txid", bytes(txid))


def _check_key(key: Buffer) -> None:
    if not isinstance(key, (bytes, bytearray, memoryview)) or len(key) != PROBE_KEY_LEN:
        raise UsageError(f"probe key must be {PROBE_KEY_LEN} bytes")


def _mac(key: Buffer, data: Buffer) -> bytes:
    return hmac.digest(bytes(key), data, hashlib.sha256)[:PROBE_MAC_LEN]


def is_probe(first_byte: int) -> bool:
    """True for the probe types; never true for a QUIC packet (bit 0x40 clear)."""
    return first_byte == PROBE_REQUEST or first_byte == PROBE_RESPONSE


def probe_session_of(data: Buffer) -> int | None:
    """Session id of something that looks like a probe, else None. Never raises on bytes."""
    view = as_view(data)
    if len(view) < 10 or not is_probe(view[0]) or view[1] != PROBE_VERSION:
        return None
    session: int = _HEAD.unpack_from(view)[2]
    return session


def encode_probe(msg: ProbeRequest | ProbeResponse, key: bytes) -> bytes:
    _check_key(key)
    if isinstance(msg, ProbeRequest):
        flags = (FLAG_NOMINATE if msg.nominate else 0) | (FLAG_CONTROLLING if msg.controlling else 0)
        body = _HEAD.pack(PROBE_REQUEST, PROBE_VERSION, msg.session) + msg.txid + bytes((flags,))
    elif isinstance(msg, ProbeResponse):
        body = (_HEAD.pack(PROBE_RESPONSE, PROBE_VERSION, msg.session) + msg.txid
                + pack_ip(msg.mapped_ip) + _PORT.pack(msg.mapped_port))
    else:
        raise UsageError(f"not a probe: {type(msg).__name__}")
    return body + _mac(key, body)


def decode_probe(data: Buffer, key: bytes) -> ProbeRequest | ProbeResponse:
    _check_key(key)
    view = as_view(data)
    n = len(view)
    if n < 11 + TXID_LEN or not is_probe(view[0]):
        raise DecodeError("not a probe")
    msg_type, version, session = _HEAD.unpack_from(view)
    if version != PROBE_VERSION:
        raise DecodeError(f"probe: unknown version {version}")
    at = 10 + TXID_LEN  # first byte after txid
    if msg_type == PROBE_REQUEST:
        expected = _REQUEST_LEN
    else:
        expected = at + 1 + ip_length(view[at]) + 2 + PROBE_MAC_LEN
    if n != expected:
        raise DecodeError(f"probe: {n} bytes, expected {expected}")
    signed = expected - PROBE_MAC_LEN
    if not hmac.compare_digest(_mac(key, view[:signed]), view[signed:]):
        raise ProbeAuthError("probe: bad mac")
    txid = bytes(view[10:at])
    if msg_type == PROBE_REQUEST:
        flags = view[at]
        if flags & ~(FLAG_NOMINATE | FLAG_CONTROLLING):
            raise DecodeError(f"probe: unknown flags 0x{flags:02x}")
        return ProbeRequest(session, txid, bool(flags & FLAG_NOMINATE),
                            bool(flags & FLAG_CONTROLLING))
    mapped_ip = unpack_ip(view[at], view[at + 1 : signed - 2])
    (port,) = _PORT.unpack_from(view, signed - 2)
    return ProbeResponse(session, txid, mapped_ip, port)
