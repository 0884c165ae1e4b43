"""Stream headers that name the destination by DNS name (docs/protocol.md §5.2).

    NamedStreamOpen          [0x58][0x01][L][service_id][N][name, N bytes][dst port u16 BE]
                             Agent -> Intermediate, Agent -> Connector (direct path)
    NamedStreamOpen, resumable=True
                             [0x5A][0x01] + the 0x58 layout: Agent -> Connector on a direct
                             P2P connection, asking for a resume token (as 0x55 does)
    RelayedNamedStreamOpen   [0x59][0x01][agent_id u32 BE][L][service_id][N][name][dst port]
                             Intermediate -> Connector, on a server-initiated stream

The name is a host name in canonical form (lower case, no trailing dot, 1..253 bytes of
letters, digits, hyphens and dots; `ztna.names.patterns.normalize_name`): the Connector
checks it against the service's patterns and resolves it itself, so the Agent never says
which address it wants. Anything else on the wire is a DecodeError, upper case included, so
one name has one encoding. `ztna.wire.stream_header.decode_stream_header` dispatches the
three first bytes here; the rest of the stream (status byte, payload) is as for 0x53.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.limits import SERVICE_ID_MAX
from ztna.names.patterns import NAME_MAX, normalize_name
from ztna.wire._common import U32_MAX, check_port, check_uint
from ztna.wire.service_id import decode_service_id, validate_service_id

__all__ = ["NAMED_HEADER_MAX", "NAMED_STREAM_OPEN", "RELAYED_NAMED_STREAM_OPEN",
           "RESUMABLE_NAMED_STREAM_OPEN", "NamedStreamOpen", "RelayedNamedStreamOpen"]

NAMED_STREAM_OPEN: Final = 0x58
RELAYED_NAMED_STREAM_OPEN: Final = 0x59
RESUMABLE_NAMED_STREAM_OPEN: Final = 0x5A
NAMED_KINDS: Final = frozenset((NAMED_STREAM_OPEN, RELAYED_NAMED_STREAM_OPEN, RESUMABLE_NAMED_STREAM_OPEN))
# 0x59 with a 63-byte id and a 253-byte name: 1+1+4+1+63+1+253+2.
NAMED_HEADER_MAX: Final = 2 + 4 + 1 + SERVICE_ID_MAX + 1 + NAME_MAX + 2

_PORT: Final = struct.Struct(">H")
_AGENT: Final = struct.Struct(">I")


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise UsageError(f"name must be a str, got {type(name).__name__}")
    try:
        canonical = normalize_name(name)
    except DecodeError as exc:
        raise UsageError(str(exc)) from None
    if canonical != name:
        raise UsageError(f"name {name!r} is not canonical (want {canonical!r})")
    return name


@dataclass(frozen=True, slots=True)
class NamedStreamOpen:
    service_id: str
    name: str
    dst_port: int
    resumable: bool = False     # encoded as 0x5A: the Agent asks for a resume token

    def __post_init__(self) -> None:
        validate_service_id(self.service_id)
        _check_name(self.name)
        check_port(self.dst_port, lo=1, what="dst_port")
        if not isinstance(self.resumable, bool):
            raise UsageError("resumable must be a bool")


@dataclass(frozen=True, slots=True)
class RelayedNamedStreamOpen:
    agent_id: int
    service_id: str
    name: str
    dst_port: int

    def __post_init__(self) -> None:
        check_uint(self.agent_id, U32_MAX, "agent_id")
        validate_service_id(self.service_id)
        _check_name(self.name)
        check_port(self.dst_port, lo=1, what="dst_port")


def encode_named(h: NamedStreamOpen | RelayedNamedStreamOpen) -> bytes:
    name = h.name.encode("ascii")
    tail = (bytes((len(h.service_id),)) + h.service_id.encode("ascii") + bytes((len(name),)) + name
            + _PORT.pack(h.dst_port))
    if isinstance(h, NamedStreamOpen):
        kind = RESUMABLE_NAMED_STREAM_OPEN if h.resumable else NAMED_STREAM_OPEN
        return bytes((kind, 1)) + tail
    return bytes((RELAYED_NAMED_STREAM_OPEN, 1)) + _AGENT.pack(h.agent_id) + tail


def decode_named(view: memoryview) -> tuple[NamedStreamOpen | RelayedNamedStreamOpen, int] | None:
    """`view` starts with a named kind and a version byte the caller has checked."""
    kind = view[0]
    n = len(view)
    pos = 6 if kind == RELAYED_NAMED_STREAM_OPEN else 2
    if n < pos + 1:
        return None
    id_len = view[pos]
    if not 1 <= id_len <= SERVICE_ID_MAX:
        raise DecodeError(f"stream header: service id length {id_len}")
    name_at = pos + 1 + id_len
    if n < name_at + 1:
        return None
    name_len = view[name_at]
    if not 1 <= name_len <= NAME_MAX:
        raise DecodeError(f"stream header: name length {name_len}")
    end = name_at + 1 + name_len + 2
    if n < end:
        return None
    service_id = decode_service_id(view[pos + 1 : name_at])
    raw = bytes(view[name_at + 1 : end - 2])
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError(f"stream header: name {raw[:64]!r} is not ASCII") from None
    if normalize_name(name) != name:
        raise DecodeError(f"stream header: name {name!r} is not canonical (lower case, no trailing dot)")
    (dst_port,) = _PORT.unpack_from(view, end - 2)
    if dst_port == 0:
        raise DecodeError("stream header: destination port 0")
    if kind == RELAYED_NAMED_STREAM_OPEN:
        (agent_id,) = _AGENT.unpack_from(view, 2)
        return RelayedNamedStreamOpen(agent_id, service_id, name, dst_port), end
    return NamedStreamOpen(service_id, name, dst_port, kind == RESUMABLE_NAMED_STREAM_OPEN), end
