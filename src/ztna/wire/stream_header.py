"""Headers of TCP-carrying QUIC streams (docs/protocol.md §5).

Each TCP connection from an Agent rides its own client-initiated bidirectional QUIC stream
(never stream 0, which is the control stream). The stream opens with a header, then carries
raw TCP payload both ways; QUIC FIN is a TCP half-close.

    StreamOpen          [0x53][0x01][L][service_id][family][dst ip 4|16][dst port u16 BE]
                        Agent -> Intermediate, Agent -> Connector (direct path)
    RelayedStreamOpen   [0x54][0x01][agent_id u32 BE][L][service_id][family][dst ip][dst port]
                        Intermediate -> Connector, on a server-initiated stream

The Connector answers with one status byte (`StreamStatus`) before any payload. OK means the
backend connection is up; any other status is followed by FIN.

`decode_stream_header(buf)` is incremental: it returns None while the header is incomplete
(the caller keeps reading and calls again with the longer buffer), fails fast with DecodeError
as soon as a byte read so far is invalid, and otherwise returns (header, bytes consumed); the
bytes after that are TCP payload. A header is at most STREAM_HEADER_MAX (89) bytes, so the
caller never needs to buffer more than that before deciding.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.limits import SERVICE_ID_MAX
from ztna.wire._common import (
    U32_MAX,
    Buffer,
    as_view,
    canonical_ip,
    check_port,
    check_uint,
    ip_length,
    pack_ip,
    unpack_ip,
)
from ztna.wire.service_id import decode_service_id, validate_service_id

__all__ = [
    "RELAYED_STREAM_OPEN",
    "STREAM_HEADER_MAX",
    "STREAM_HEADER_VERSION",
    "STREAM_OPEN",
    "RelayedStreamOpen",
    "StreamOpen",
    "StreamStatus",
    "decode_stream_header",
    "decode_stream_status",
    "encode_stream_open",
    "encode_stream_status",
]

STREAM_OPEN: Final = 0x53
RELAYED_STREAM_OPEN: Final = 0x54
STREAM_HEADER_VERSION: Final = 1
# 0x54 with a 63-byte id and an IPv6 destination: 1+1+4+1+63+1+16+2.
STREAM_HEADER_MAX: Final = 2 + 4 + 1 + SERVICE_ID_MAX + 1 + 16 + 2

_PORT: Final = struct.Struct(">H")
_AGENT: Final = struct.Struct(">I")


class StreamStatus(enum.IntEnum):
    OK = 0
    REFUSED = 1         # the backend refused the TCP connection (RST)
    UNREACHABLE = 2     # no route / connect timeout to the backend
    NOT_AUTHORIZED = 3  # this agent may not reach this destination
    NO_SUCH_PORT = 4    # destination port not offered by the service
    LIMIT = 5           # too many streams / flows


@dataclass(frozen=True, slots=True)
class StreamOpen:
    service_id: str
    dst_ip: str
    dst_port: int

    def __post_init__(self) -> None:
        validate_service_id(self.service_id)
        object.__setattr__(self, "dst_ip", canonical_ip(self.dst_ip))
        check_port(self.dst_port, lo=1, what="dst_port")


@dataclass(frozen=True, slots=True)
class RelayedStreamOpen:
    agent_id: int
    service_id: str
    dst_ip: str
    dst_port: int

    def __post_init__(self) -> None:
        check_uint(self.agent_id, U32_MAX, "agent_id")
        validate_service_id(self.service_id)
        object.__setattr__(self, "dst_ip", canonical_ip(self.dst_ip))
        check_port(self.dst_port, lo=1, what="dst_port")


StreamHeader = StreamOpen | RelayedStreamOpen


def encode_stream_open(h: StreamHeader) -> bytes:
    if not isinstance(h, (StreamOpen, RelayedStreamOpen)):
        raise UsageError(f"not a stream header: {type(h).__name__}")
    tail = (bytes((len(h.service_id),)) + h.service_id.encode("ascii")
            + pack_ip(h.dst_ip) + _PORT.pack(h.dst_port))
    if isinstance(h, StreamOpen):
        return bytes((STREAM_OPEN, STREAM_HEADER_VERSION)) + tail
    return bytes((RELAYED_STREAM_OPEN, STREAM_HEADER_VERSION)) + _AGENT.pack(h.agent_id) + tail


def decode_stream_header(buf: Buffer) -> tuple[StreamHeader, int] | None:
    """(header, bytes consumed), or None if `buf` is a valid but incomplete prefix."""
    view = as_view(buf)
    n = len(view)
    if n < 1:
        return None
    kind = view[0]
    if kind == STREAM_OPEN:
        pos = 2
    elif kind == RELAYED_STREAM_OPEN:
        pos = 6
    else:
        raise DecodeError(f"unknown stream header type 0x{kind:02x}")
    if n < 2:
        return None
    if view[1] != STREAM_HEADER_VERSION:
        raise DecodeError(f"unknown stream header version {view[1]}")
    if n < pos + 1:
        return None
    id_len = view[pos]
    if not 1 <= id_len <= SERVICE_ID_MAX:
        raise DecodeError(f"stream header: service id length {id_len}")
    fam_at = pos + 1 + id_len
    if n < fam_at + 1:
        return None
    end = fam_at + 1 + ip_length(view[fam_at]) + 2
    if n < end:
        return None
    service_id = decode_service_id(view[pos + 1 : fam_at])
    dst_ip = unpack_ip(view[fam_at], view[fam_at + 1 : end - 2])
    (dst_port,) = _PORT.unpack_from(view, end - 2)
    if dst_port == 0:
        raise DecodeError("stream header: destination port 0")
    if kind == STREAM_OPEN:
        return StreamOpen(service_id, dst_ip, dst_port), end
    (agent_id,) = _AGENT.unpack_from(view, 2)
    return RelayedStreamOpen(agent_id, service_id, dst_ip, dst_port), end


def encode_stream_status(status: StreamStatus) -> bytes:
    return bytes((StreamStatus(status),))


def decode_stream_status(first_byte: int) -> StreamStatus:
    """The Connector's status byte; DecodeError if unknown."""
    try:
        return StreamStatus(first_byte)
    except ValueError:
        raise DecodeError(f"unknown stream status {first_byte!r}") from None
