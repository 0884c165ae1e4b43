"""Headers of TCP-carrying QUIC streams (docs/protocol.md §5).

Each TCP connection from an Agent rides its own client-initiated bidirectional QUIC stream
(never stream 0, which is the control stream). The stream opens with a header, then carries
raw TCP payload both ways; QUIC FIN is a TCP half-close.

    StreamOpen          [0x53][0x01][L][service_id][family][dst ip 4|16][dst port u16 BE]
                        Agent -> Intermediate, Agent -> Connector (direct path)
    RelayedStreamOpen   [0x54][0x01][agent_id u32 BE][L][service_id][family][dst ip][dst port]
                        Intermediate -> Connector, on a server-initiated stream
    StreamOpen, resumable=True
                        [0x55][0x01] + the 0x53 layout: Agent -> Connector on a direct P2P
                        connection, asking for a resume token
    StreamResume        [0x56][0x01][L][service_id][token 16][received u64 BE]
                        Agent -> Intermediate (or a direct connection): continue the stream
                        that `token` names; `received` = payload bytes the Agent has taken
    RelayedStreamResume [0x57][0x01][agent_id u32 BE][L][service_id][token 16][received u64]
                        Intermediate -> Connector
    NamedStreamOpen, RelayedNamedStreamOpen (0x58, 0x5A, 0x59)
                        the destination as a DNS name instead of an IP
                        (`ztna.wire.named_stream`, decoded here too)

The Connector answers with one status byte (`StreamStatus`) before any payload. OK means the
backend connection is up; any other status is followed by FIN. Two statuses carry a fixed
tail (`decode_stream_reply`): OK_RESUMABLE + the 16-byte token (answer to 0x55), RESUMED +
the Connector's own received count u64 (answer to 0x56/0x57). Both sides then resend their
payload from the peer's count. A 0x53 stream never sees either, so old Agents are unaffected.

`decode_stream_header(buf)` is incremental: it returns None while the header is incomplete
(the caller keeps reading and calls again with the longer buffer), fails fast with DecodeError
as soon as a byte read so far is invalid, and otherwise returns (header, bytes consumed); the
bytes after that are TCP payload. A header is at most STREAM_HEADER_MAX (94) bytes, so the
caller never needs to buffer more than that before deciding (NAMED_HEADER_MAX, 326, for
the named headers).
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
from ztna.wire.named_stream import (
    NAMED_HEADER_MAX,
    NAMED_KINDS,
    NamedStreamOpen,
    RelayedNamedStreamOpen,
    decode_named,
    encode_named,
)
from ztna.wire.service_id import decode_service_id, validate_service_id

__all__ = [
    "RELAYED_STREAM_OPEN",
    "RELAYED_STREAM_RESUME",
    "RESUMABLE_STREAM_OPEN",
    "RESUME_TOKEN_LEN",
    "RelayedStreamResume",
    "ANY_STREAM_HEADER_MAX",
    "NamedStreamOpen",
    "RelayedNamedStreamOpen",
    "STREAM_RESUME",
    "StreamResume",
    "decode_stream_reply",
    "encode_stream_reply",
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
RESUMABLE_STREAM_OPEN: Final = 0x55
STREAM_RESUME: Final = 0x56
RELAYED_STREAM_RESUME: Final = 0x57
STREAM_HEADER_VERSION: Final = 1
RESUME_TOKEN_LEN: Final = 16
# 0x57 with a 63-byte id: 1+1+4+1+63+16+8 (0x54 with IPv6 is 89).
STREAM_HEADER_MAX: Final = 2 + 4 + 1 + SERVICE_ID_MAX + RESUME_TOKEN_LEN + 8
# The longest header of any kind: what a reader buffers at most before it can decide.
ANY_STREAM_HEADER_MAX: Final = max(STREAM_HEADER_MAX, NAMED_HEADER_MAX)

_PORT: Final = struct.Struct(">H")
_AGENT: Final = struct.Struct(">I")
_COUNT: Final = struct.Struct(">Q")


class StreamStatus(enum.IntEnum):
    OK = 0
    REFUSED = 1         # the backend refused the TCP connection (RST)
    UNREACHABLE = 2     # no route / connect timeout to the backend
    NOT_AUTHORIZED = 3  # this agent may not reach this destination
    NO_SUCH_PORT = 4    # destination port not offered by the service
    LIMIT = 5           # too many streams / flows
    OK_RESUMABLE = 6    # OK, followed by a 16-byte resume token (answer to 0x55 only)
    RESUMED = 7         # resumed, followed by the Connector's received count u64
    NO_SUCH_STREAM = 8  # resume refused: unknown/expired/foreign token, counts out of range
    NAME_UNRESOLVED = 9  # the Connector could not resolve the name (NXDOMAIN, no address, timeout)


# Fixed tail after a status byte.
_REPLY_TAIL: Final = {StreamStatus.OK_RESUMABLE: RESUME_TOKEN_LEN, StreamStatus.RESUMED: 8}


@dataclass(frozen=True, slots=True)
class StreamOpen:
    service_id: str
    dst_ip: str
    dst_port: int
    resumable: bool = False     # encoded as 0x55: the Agent asks for a resume token

    def __post_init__(self) -> None:
        validate_service_id(self.service_id)
        object.__setattr__(self, "dst_ip", canonical_ip(self.dst_ip))
        check_port(self.dst_port, lo=1, what="dst_port")
        if not isinstance(self.resumable, bool):
            raise UsageError("resumable must be a bool")


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


def _check_resume(token: object, received: object) -> None:
    if not isinstance(token, bytes) or len(token) != RESUME_TOKEN_LEN:
        raise UsageError(f"resume token must be {RESUME_TOKEN_LEN} bytes")
    check_uint(received, U64_MAX, "received")


@dataclass(frozen=True, slots=True)
class StreamResume:
    service_id: str
    token: bytes
    received: int

    def __post_init__(self) -> None:
        validate_service_id(self.service_id)
        _check_resume(self.token, self.received)


@dataclass(frozen=True, slots=True)
class RelayedStreamResume:
    agent_id: int
    service_id: str
    token: bytes
    received: int

    def __post_init__(self) -> None:
        check_uint(self.agent_id, U32_MAX, "agent_id")
        validate_service_id(self.service_id)
        _check_resume(self.token, self.received)


StreamHeader = (StreamOpen | RelayedStreamOpen | StreamResume | RelayedStreamResume | NamedStreamOpen
                | RelayedNamedStreamOpen)


def encode_stream_open(h: StreamHeader) -> bytes:
    """Encode any stream header (the name predates the resume and named headers)."""
    if isinstance(h, (NamedStreamOpen, RelayedNamedStreamOpen)):
        return encode_named(h)
    if not isinstance(h, (StreamOpen, RelayedStreamOpen, StreamResume, RelayedStreamResume)):
        raise UsageError(f"not a stream header: {type(h).__name__}")
    sid = bytes((len(h.service_id),)) + h.service_id.encode("ascii")
    if isinstance(h, (StreamResume, RelayedStreamResume)):
        tail = sid + h.token + _COUNT.pack(h.received)
        if isinstance(h, StreamResume):
            return bytes((STREAM_RESUME, STREAM_HEADER_VERSION)) + tail
        return bytes((RELAYED_STREAM_RESUME, STREAM_HEADER_VERSION)) + _AGENT.pack(h.agent_id) + tail
    tail = sid + pack_ip(h.dst_ip) + _PORT.pack(h.dst_port)
    if isinstance(h, StreamOpen):
        kind = RESUMABLE_STREAM_OPEN if h.resumable else STREAM_OPEN
        return bytes((kind, STREAM_HEADER_VERSION)) + tail
    return bytes((RELAYED_STREAM_OPEN, STREAM_HEADER_VERSION)) + _AGENT.pack(h.agent_id) + tail


def decode_stream_header(buf: Buffer) -> tuple[StreamHeader, int] | None:
    """(header, bytes consumed), or None if `buf` is a valid but incomplete prefix."""
    view = as_view(buf)
    n = len(view)
    if n < 1:
        return None
    kind = view[0]
    if kind in NAMED_KINDS:
        if n < 2:
            return None
        if view[1] != STREAM_HEADER_VERSION:
            raise DecodeError(f"unknown stream header version {view[1]}")
        return decode_named(view)
    if kind in (STREAM_OPEN, RESUMABLE_STREAM_OPEN, STREAM_RESUME):
        pos = 2
    elif kind in (RELAYED_STREAM_OPEN, RELAYED_STREAM_RESUME):
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
    if kind in (STREAM_RESUME, RELAYED_STREAM_RESUME):
        end = fam_at + RESUME_TOKEN_LEN + 8
        if n < end:
            return None
        service_id = decode_service_id(view[pos + 1 : fam_at])
        token = bytes(view[fam_at : fam_at + RESUME_TOKEN_LEN])
        (received,) = _COUNT.unpack_from(view, end - 8)
        if kind == STREAM_RESUME:
            return StreamResume(service_id, token, received), end
        (agent_id,) = _AGENT.unpack_from(view, 2)
        return RelayedStreamResume(agent_id, service_id, token, received), end
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
    if kind in (STREAM_OPEN, RESUMABLE_STREAM_OPEN):
        return StreamOpen(service_id, dst_ip, dst_port, kind == RESUMABLE_STREAM_OPEN), end
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


def encode_stream_reply(status: StreamStatus, extra: bytes | int | None = None) -> bytes:
    """Status byte plus its fixed tail: the token for OK_RESUMABLE, the count for RESUMED."""
    status = StreamStatus(status)
    if status is StreamStatus.OK_RESUMABLE:
        if not isinstance(extra, bytes) or len(extra) != RESUME_TOKEN_LEN:
            raise UsageError(f"OK_RESUMABLE needs a {RESUME_TOKEN_LEN}-byte token")
        return bytes((status,)) + extra
    if status is StreamStatus.RESUMED:
        return bytes((status,)) + _COUNT.pack(check_uint(extra, U64_MAX, "received"))
    if extra is not None:
        raise UsageError(f"status {status.name} carries nothing")
    return bytes((status,))


def decode_stream_reply(buf: Buffer) -> tuple[StreamStatus, bytes | int | None, int] | None:
    """(status, token | count | None, bytes consumed), or None while incomplete."""
    view = as_view(buf)
    if len(view) < 1:
        return None
    status = decode_stream_status(view[0])
    tail = _REPLY_TAIL.get(status, 0)
    if len(view) < 1 + tail:
        return None
    if status is StreamStatus.OK_RESUMABLE:
        return status, bytes(view[1 : 1 + tail]), 1 + tail
    if status is StreamStatus.RESUMED:
        return status, _COUNT.unpack_from(view, 1)[0], 1 + tail
    return status, None, 1
