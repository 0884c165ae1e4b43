"""The reliable control stream (docs/protocol.md §4).

Every QUIC connection has exactly one control stream: right after the handshake the client
opens the first client-initiated bidirectional stream (id 0) and both sides send frames on
it for the life of the connection. It carries what must not be lost: QAD, registration and
the JSON messages (errors, goaway, punch signalling, ...).

Frame: `[length u16 BE = N][type u8][body: N-1 bytes]`, 1 <= N <= CONTROL_FRAME_MAX (16384).

    type 0x01        QAD body            (encode_qad_body layout)
    type 0x10..0x13  registration body   (the DATAGRAM form minus its type byte)
    type 0x20        JSON message        (control_messages.py)

`ControlDecoder` is incremental: `feed(data)` returns the messages completed so far and
buffers the rest. Its buffer holds at most one partial frame plus what was just fed, and the
length is checked as soon as the 2-byte prefix arrives. ANY DecodeError from `feed` (bad length,
unknown frame type, undecodable body) is fatal: the decoder refuses further input and the
caller must close the stream (and normally the connection) — after a protocol violation we do
not try to resynchronise. Forward compatibility lives inside 0x20: unknown JSON types decode to
`UnknownMessage`, which receivers ignore.
"""

from __future__ import annotations

import struct
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.limits import CONTROL_FRAME_MAX
from ztna.wire._common import Buffer, as_view
from ztna.wire.control_messages import JsonMessage, decode_json_body, encode_json_body
from ztna.wire.qad import QAD_TYPE, ObservedAddress, decode_qad_body, encode_qad_body
from ztna.wire.registration import (
    REGISTRATION_TYPES,
    Register,
    RegistrationAck,
    RegistrationMessage,
    RegistrationNack,
    decode_registration_body,
    encode_registration_body,
)

__all__ = [
    "CONTROL_FRAME_MAX",
    "CONTROL_JSON",
    "CONTROL_STREAM_ID",
    "ControlDecoder",
    "ControlMessage",
    "decode_control_frame",
    "encode_control",
]

CONTROL_STREAM_ID: Final = 0
CONTROL_JSON: Final = 0x20
_HEADER: Final = struct.Struct(">HB")

ControlMessage = ObservedAddress | RegistrationMessage | JsonMessage


def encode_control(msg: ControlMessage) -> bytes:
    """One whole control frame for `msg` (UsageError if it is not a control message or too big)."""
    if isinstance(msg, ObservedAddress):
        frame_type, body = QAD_TYPE, encode_qad_body(msg)
    elif isinstance(msg, (Register, RegistrationAck, RegistrationNack)):
        frame_type, body = encode_registration_body(msg)
    else:
        frame_type, body = CONTROL_JSON, encode_json_body(msg)
    length = 1 + len(body)
    if length > CONTROL_FRAME_MAX:
        raise UsageError(f"control frame of {length} bytes exceeds {CONTROL_FRAME_MAX}")
    return _HEADER.pack(length, frame_type) + body


def _decode_body(frame_type: int, body: memoryview) -> ControlMessage:
    if frame_type == CONTROL_JSON:
        return decode_json_body(body)
    if frame_type == QAD_TYPE:
        return decode_qad_body(body)
    if frame_type in REGISTRATION_TYPES:
        return decode_registration_body(frame_type, body)
    raise DecodeError(f"unknown control frame type 0x{frame_type:02x}")


def _check_length(length: int) -> None:
    if length == 0 or length > CONTROL_FRAME_MAX:
        raise DecodeError(f"control frame length {length} outside 1..{CONTROL_FRAME_MAX}")


def decode_control_frame(frame: Buffer) -> ControlMessage:
    """Decode exactly one complete frame (length prefix included; no trailing bytes)."""
    view = as_view(frame)
    if len(view) < 3:
        raise DecodeError("control frame shorter than 3 bytes")
    length, frame_type = _HEADER.unpack_from(view)
    _check_length(length)
    if len(view) != 2 + length:
        raise DecodeError(f"control frame declares {length} bytes, has {len(view) - 2}")
    return _decode_body(frame_type, view[3:])


class ControlDecoder:
    """Incremental decoder for one control stream. Not reusable after a DecodeError."""

    __slots__ = ("_buf", "_failed")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame currently held."""
        return len(self._buf)

    @property
    def failed(self) -> bool:
        return self._failed

    def feed(self, data: Buffer) -> list[ControlMessage]:
        """Add stream bytes; return every message completed by them, in order."""
        if self._failed:
            raise DecodeError("control stream already failed; close it")
        buf = self._buf
        buf += as_view(data)
        out: list[ControlMessage] = []
        pos = 0
        try:
            while len(buf) - pos >= 2:
                length = (buf[pos] << 8) | buf[pos + 1]
                _check_length(length)
                end = pos + 2 + length
                if len(buf) < end:
                    break
                # bytes() copy: the body must not alias `buf`, which we resize below.
                body = bytes(buf[pos + 3 : end])
                out.append(_decode_body(buf[pos + 2], memoryview(body)))
                pos = end
        except DecodeError:
            self._failed = True
            buf.clear()
            raise
        del buf[:pos]
        return out
