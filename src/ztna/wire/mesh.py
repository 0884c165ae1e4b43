"""Mesh DATAGRAMs: tunnel traffic between two Intermediates of a cluster (docs/protocol.md §3.6).

When an Agent is attached to one member (A) and the Connector its flow is placed on to another
(B), A wraps the Agent's packet for B, and B wraps the Connector's answer for A:

    0x32 MESH_TO_CONNECTOR    member A -> member B
                              [0x32][0x01][agent ref u32 BE][L][service_id][ip packet]
    0x33 MESH_FROM_CONNECTOR  member B -> member A
                              [0x33][0x01][agent ref u32 BE][ip packet]

The layouts are those of 0x30 / 0x31 with another type byte: the agent ref is A's id for the
Agent, so B turns 0x32 into 0x30 for its Connector by replacing the first six bytes (its own
id for that remote Agent instead of A's), and A hands the bytes after the sixth of 0x33 to
the Agent. The same rules hold: the packet is non-empty and starts like an IP packet.
"""

from __future__ import annotations

import struct
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.wire._common import U32_MAX, Buffer, as_view, is_ip_first_byte
from ztna.wire.service_id import decode_service_id, validate_service_id

__all__ = [
    "MESH_FROM_CONNECTOR",
    "MESH_TO_CONNECTOR",
    "MESH_VERSION",
    "decode_mesh_from_connector",
    "decode_mesh_to_connector",
    "encode_mesh_from_connector",
    "encode_mesh_to_connector",
]

MESH_TO_CONNECTOR: Final = 0x32
MESH_FROM_CONNECTOR: Final = 0x33
MESH_VERSION: Final = 0x01

_HDR: Final = struct.Struct(">BBI")   # type, version, agent ref


def _check(ref: int, packet: Buffer) -> None:
    if type(ref) is not int or not 0 <= ref <= U32_MAX:
        raise UsageError(f"agent ref must be a u32, got {ref!r}")
    if not packet or not is_ip_first_byte(packet[0]):
        raise UsageError("packet must be a non-empty IPv4/IPv6 packet")


def encode_mesh_to_connector(ref: int, service_id: str, packet: Buffer) -> bytes:
    validate_service_id(service_id)
    _check(ref, packet)
    sid = service_id.encode("ascii")
    return _HDR.pack(MESH_TO_CONNECTOR, MESH_VERSION, ref) + bytes((len(sid),)) + sid + bytes(packet)


def decode_mesh_to_connector(data: Buffer) -> tuple[int, str, memoryview]:
    """(agent ref, service id, packet view). DecodeError if malformed."""
    view = as_view(data)
    if len(view) < 8 or view[0] != MESH_TO_CONNECTOR:
        raise DecodeError("short or non-0x32 datagram")
    if view[1] != MESH_VERSION:
        raise DecodeError(f"unknown version {view[1]} of 0x32")
    ref = _HDR.unpack_from(view)[2]
    end = 7 + view[6]
    if len(view) <= end:
        raise DecodeError("0x32 carries a missing or non-IP packet")
    service = decode_service_id(view[7:end].tobytes())
    packet = view[end:]
    if not packet or not is_ip_first_byte(packet[0]):
        raise DecodeError("0x32 carries a missing or non-IP packet")
    return ref, service, packet


def encode_mesh_from_connector(ref: int, packet: Buffer) -> bytes:
    _check(ref, packet)
    return _HDR.pack(MESH_FROM_CONNECTOR, MESH_VERSION, ref) + bytes(packet)


def decode_mesh_from_connector(data: Buffer) -> tuple[int, memoryview]:
    """(agent ref, packet view). DecodeError if malformed."""
    view = as_view(data)
    if len(view) < 7 or view[0] != MESH_FROM_CONNECTOR:
        raise DecodeError("short or non-0x33 datagram")
    if view[1] != MESH_VERSION:
        raise DecodeError(f"unknown version {view[1]} of 0x33")
    packet = view[6:]
    if not is_ip_first_byte(packet[0]):
        raise DecodeError("0x33 carries something that is not an IP packet")
    return _HDR.unpack_from(view)[2], packet
