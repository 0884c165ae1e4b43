"""Tunnel DATAGRAMs: IP packets inside QUIC DATAGRAM frames (docs/protocol.md §3.3-3.5).

Every DATAGRAM is classified by its first byte (`classify_datagram`, one table lookup). Type
bytes are chosen outside 0x45-0x4F (IPv4) and 0x60-0x6F (IPv6), so a bare IP packet — what an
Agent receives — can never be mistaken for a message, and vice versa.

    0x2F SERVICE         Agent -> Intermediate, Agent -> Connector (direct path)
                         [0x2F][L][service_id][ip packet]
    0x30 TO_CONNECTOR    Intermediate -> Connector
                         [0x30][0x01][agent_id u32 BE][L][service_id][ip packet]
    0x31 FROM_CONNECTOR  Connector -> Intermediate
                         [0x31][0x01][agent_id u32 BE][ip packet]
    0x45-0x4F, 0x60-0x6F bare IP packet (Intermediate -> Agent, Connector -> Agent direct)

The part of 0x30 after the agent id is byte-identical to a 0x2F datagram minus its type byte,
so the relay turns one into the other with a single prepend (`to_connector_from_service_datagram`).

Hot path rules: decoders never copy the packet (they return a `memoryview` slice of the input,
which keeps the input alive and, for a bytearray, pins its size); headers are read with
precompiled `struct.Struct`s; service ids go through the memoising `decode_service_id`.
Every carried packet must be non-empty and start like an IP packet (0x45-0x4F/0x60-0x6F):
this keeps a Connector from smuggling 0x01/0x12-style messages to an Agent via 0x31.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.wire._common import IP_FIRST_TABLE, U32_MAX, Buffer, as_view, is_ip_first_byte
from ztna.wire.service_id import _cache as _sid_cache
from ztna.wire.service_id import decode_service_id, validate_service_id

__all__ = [
    "FROM_CONNECTOR",
    "SERVICE_DATAGRAM",
    "TO_CONNECTOR",
    "TUNNEL_VERSION",
    "DatagramKind",
    "classify_datagram",
    "decode_from_connector",
    "decode_service_datagram",
    "decode_to_connector",
    "encode_from_connector",
    "from_connector_prefix",
    "encode_service_datagram",
    "encode_to_connector",
    "service_datagram_overhead",
    "service_datagram_prefix",
    "to_connector_from_service_datagram",
    "to_connector_overhead",
    "FROM_CONNECTOR_OVERHEAD",
]

SERVICE_DATAGRAM: Final = 0x2F
TO_CONNECTOR: Final = 0x30
FROM_CONNECTOR: Final = 0x31
TUNNEL_VERSION: Final = 1

FROM_CONNECTOR_OVERHEAD: Final = 6

_HDR_30: Final = struct.Struct(">BBIB")  # type, version, agent_id, L
_HDR_31: Final = struct.Struct(">BBI")   # type, version, agent_id
_PREFIX_30: Final = struct.Struct(">BBI")


class DatagramKind(enum.Enum):
    QAD = "qad"
    REGISTRATION = "registration"
    SERVICE = "service"
    TO_CONNECTOR = "to_connector"
    FROM_CONNECTOR = "from_connector"
    IPV4 = "ipv4"
    IPV6 = "ipv6"
    UNKNOWN = "unknown"


def _build_table() -> tuple[DatagramKind, ...]:
    table = [DatagramKind.UNKNOWN] * 256
    table[0x01] = DatagramKind.QAD
    for b in (0x10, 0x11, 0x12, 0x13):
        table[b] = DatagramKind.REGISTRATION
    table[SERVICE_DATAGRAM] = DatagramKind.SERVICE
    table[TO_CONNECTOR] = DatagramKind.TO_CONNECTOR
    table[FROM_CONNECTOR] = DatagramKind.FROM_CONNECTOR
    for b in range(0x45, 0x50):
        table[b] = DatagramKind.IPV4
    for b in range(0x60, 0x70):
        table[b] = DatagramKind.IPV6
    return tuple(table)


_KIND: Final = _build_table()


def classify_datagram(first_byte: int) -> DatagramKind:
    """Kind of a DATAGRAM from its first byte (UNKNOWN for anything unassigned)."""
    if 0 <= first_byte <= 0xFF:
        return _KIND[first_byte]
    return DatagramKind.UNKNOWN


def service_datagram_overhead(service_id: str) -> int:
    """Bytes a 0x2F header adds to an IP packet: 2 + len(id)."""
    return 2 + len(service_id)


def to_connector_overhead(service_id: str) -> int:
    """Bytes a 0x30 header adds to an IP packet: 7 + len(id)."""
    return 7 + len(service_id)


def _check_packet(packet: Buffer) -> None:
    if not packet or not is_ip_first_byte(packet[0]):
        raise UsageError("packet must be a non-empty IPv4/IPv6 packet")


def _check_agent(agent_id: int) -> None:
    if type(agent_id) is not int or not 0 <= agent_id <= U32_MAX:
        raise UsageError(f"agent_id must be a u32, got {agent_id!r}")


def _view(data: Buffer) -> memoryview:
    # Fast path for the common case (the QUIC layer hands us bytes); as_view handles the rest.
    return memoryview(data) if type(data) is bytes else as_view(data)


def _service_id(data: Buffer, view: memoryview, start: int, end: int) -> str:
    # Slicing bytes directly is cheaper than slicing the view and copying; the memo lookup
    # skips the regex for ids seen before (decode_service_id validates and fills the memo).
    key = data[start:end] if type(data) is bytes else view[start:end].tobytes()
    sid = _sid_cache.get(key)
    return sid if sid is not None else decode_service_id(key)


# ---- 0x2F -------------------------------------------------------------------------------

def service_datagram_prefix(service_id: str) -> bytes:
    """The 0x2F header for `service_id` alone (prepend an IP packet to get the DATAGRAM)."""
    validate_service_id(service_id)
    raw = service_id.encode("ascii")
    return bytes((SERVICE_DATAGRAM, len(raw))) + raw


def encode_service_datagram(service_id: str, packet: Buffer) -> bytes:
    validate_service_id(service_id)
    _check_packet(packet)
    return bytes((SERVICE_DATAGRAM, len(service_id))) + service_id.encode("ascii") + packet


def decode_service_datagram(data: Buffer) -> tuple[str, memoryview]:
    """(service_id, packet view). DecodeError if malformed."""
    view = _view(data)
    n = len(view)
    if n < 4 or view[0] != SERVICE_DATAGRAM:
        raise DecodeError("short or non-0x2F datagram")
    end = 2 + view[1]
    if n <= end or not IP_FIRST_TABLE[view[end]]:
        raise DecodeError("0x2F: missing or non-IP packet")
    return _service_id(data, view, 2, end), view[end:]


def to_connector_from_service_datagram(agent_id: int, service_dgram: Buffer) -> bytes:
    """0x30 datagram from a 0x2F one the caller has already decoded (no re-validation)."""
    _check_agent(agent_id)
    return _PREFIX_30.pack(TO_CONNECTOR, TUNNEL_VERSION, agent_id) + service_dgram[1:]


# ---- 0x30 -------------------------------------------------------------------------------

def encode_to_connector(agent_id: int, service_id: str, packet: Buffer) -> bytes:
    _check_agent(agent_id)
    validate_service_id(service_id)
    _check_packet(packet)
    return (
        _HDR_30.pack(TO_CONNECTOR, TUNNEL_VERSION, agent_id, len(service_id))
        + service_id.encode("ascii")
        + packet
    )


def decode_to_connector(data: Buffer) -> tuple[int, str, memoryview]:
    """(agent_id, service_id, packet view). DecodeError if malformed or unknown version."""
    view = _view(data)
    n = len(view)
    if n < 9:
        raise DecodeError("short 0x30 datagram")
    msg_type, version, agent_id, length = _HDR_30.unpack_from(view)
    if msg_type != TO_CONNECTOR:
        raise DecodeError("not a 0x30 datagram")
    if version != TUNNEL_VERSION:
        raise DecodeError(f"0x30: unknown version {version}")
    end = 7 + length
    if n <= end or not IP_FIRST_TABLE[view[end]]:
        raise DecodeError("0x30: missing or non-IP packet")
    return agent_id, _service_id(data, view, 7, end), view[end:]


# ---- 0x31 -------------------------------------------------------------------------------

def from_connector_prefix(agent_id: int) -> bytes:
    """The 0x31 header for `agent_id` alone (FROM_CONNECTOR_OVERHEAD bytes): a sender that
    prepends it to many packets builds it once."""
    _check_agent(agent_id)
    return _HDR_31.pack(FROM_CONNECTOR, TUNNEL_VERSION, agent_id)


def encode_from_connector(agent_id: int, packet: Buffer) -> bytes:
    _check_agent(agent_id)
    _check_packet(packet)
    return _HDR_31.pack(FROM_CONNECTOR, TUNNEL_VERSION, agent_id) + packet


def decode_from_connector(data: Buffer) -> tuple[int, memoryview]:
    """(agent_id, packet view). DecodeError if malformed or unknown version."""
    view = _view(data)
    if len(view) < 7:
        raise DecodeError("short 0x31 datagram")
    msg_type, version, agent_id = _HDR_31.unpack_from(view)
    if msg_type != FROM_CONNECTOR:
        raise DecodeError("not a 0x31 datagram")
    if version != TUNNEL_VERSION:
        raise DecodeError(f"0x31: unknown version {version}")
    if not IP_FIRST_TABLE[view[6]]:
        raise DecodeError("0x31: payload is not an IP packet")
    return agent_id, view[6:]
