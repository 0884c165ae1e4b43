"""Service registration, types 0x10-0x13 (docs/protocol.md §3.2).

An Agent registers the services it wants to reach (0x10) and a Connector the service it
serves (0x11); the Intermediate answers each with an ACK (0x12) or a NACK (0x13) carrying a
status. Layouts (exact length, trailing bytes are an error):

    Register          [0x10|0x11][L u8][id: L bytes]
    RegistrationAck   [0x12][0x00][L][id]
    RegistrationNack  [0x13][status][L][id]      (L = 0 allowed only here)

A NACK for a request that could not even be decoded carries an empty id. The same messages
minus their type byte are the bodies of control frames 0x10-0x13 (`encode_registration_body`).
Unknown NACK status codes and a non-zero ACK status byte are decode errors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.wire._common import Buffer, as_view
from ztna.wire.service_id import decode_service_id, validate_service_id

__all__ = [
    "REGISTER_AGENT",
    "REGISTER_CONNECTOR",
    "REGISTRATION_ACK",
    "REGISTRATION_NACK",
    "NackStatus",
    "Register",
    "RegistrationAck",
    "RegistrationMessage",
    "RegistrationNack",
    "Role",
    "decode_registration",
    "decode_registration_body",
    "encode_registration",
    "encode_registration_body",
]

REGISTER_AGENT: Final = 0x10
REGISTER_CONNECTOR: Final = 0x11
REGISTRATION_ACK: Final = 0x12
REGISTRATION_NACK: Final = 0x13
REGISTRATION_TYPES: Final = frozenset({0x10, 0x11, 0x12, 0x13})


class Role(enum.Enum):
    AGENT = "agent"
    CONNECTOR = "connector"


class NackStatus(enum.IntEnum):
    INVALID_REQUEST = 0x01   # undecodable request or invalid service id
    NOT_AUTHORIZED = 0x02    # the client certificate does not allow this service/role
    SERVICE_CONFLICT = 0x03  # the service is held by another identity
    LIMIT_EXCEEDED = 0x04    # too many registrations on this connection / in the registry
    SHUTTING_DOWN = 0x05     # the Intermediate is draining; reconnect elsewhere/later


_ROLE_TYPE: Final = {Role.AGENT: REGISTER_AGENT, Role.CONNECTOR: REGISTER_CONNECTOR}
_TYPE_ROLE: Final = {v: k for k, v in _ROLE_TYPE.items()}


@dataclass(frozen=True, slots=True)
class Register:
    role: Role
    service_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise UsageError(f"role must be a Role, got {self.role!r}")
        validate_service_id(self.service_id)


@dataclass(frozen=True, slots=True)
class RegistrationAck:
    service_id: str

    def __post_init__(self) -> None:
        validate_service_id(self.service_id)


@dataclass(frozen=True, slots=True)
class RegistrationNack:
    service_id: str  # may be "" when the request could not be decoded
    status: NackStatus

    def __post_init__(self) -> None:
        if self.service_id != "":
            validate_service_id(self.service_id)
        if type(self.status) is not NackStatus:
            try:
                object.__setattr__(self, "status", NackStatus(self.status))
            except ValueError:
                raise UsageError(f"unknown NACK status {self.status!r}") from None


RegistrationMessage = Register | RegistrationAck | RegistrationNack


def _id_field(sid: str) -> bytes:
    return bytes((len(sid),)) + sid.encode("ascii")


def encode_registration_body(msg: RegistrationMessage) -> tuple[int, bytes]:
    """(type byte, body without the type byte)."""
    if isinstance(msg, Register):
        return _ROLE_TYPE[msg.role], _id_field(msg.service_id)
    if isinstance(msg, RegistrationAck):
        return REGISTRATION_ACK, b"\x00" + _id_field(msg.service_id)
    if isinstance(msg, RegistrationNack):
        return REGISTRATION_NACK, bytes((msg.status,)) + _id_field(msg.service_id)
    raise UsageError(f"not a registration message: {type(msg).__name__}")


def encode_registration(msg: RegistrationMessage) -> bytes:
    msg_type, body = encode_registration_body(msg)
    return bytes((msg_type,)) + body


def _decode_id(view: memoryview, *, allow_empty: bool = False) -> str:
    """`view` is `[L][id]`, exactly."""
    if not view:
        raise DecodeError("registration: missing id length")
    length = view[0]
    if len(view) != 1 + length:
        raise DecodeError(f"registration: id length {length} does not match {len(view) - 1} bytes")
    if length == 0 and allow_empty:
        return ""
    return decode_service_id(view[1:])


def decode_registration_body(msg_type: int, body: Buffer) -> RegistrationMessage:
    """Decode a registration message given its type byte and the rest of the message."""
    view = as_view(body)
    role = _TYPE_ROLE.get(msg_type)
    if role is not None:
        return Register(role, _decode_id(view))
    if msg_type == REGISTRATION_ACK:
        if not view or view[0] != 0x00:
            raise DecodeError("registration ACK: status byte must be 0x00")
        return RegistrationAck(_decode_id(view[1:]))
    if msg_type == REGISTRATION_NACK:
        if not view:
            raise DecodeError("registration NACK: missing status")
        try:
            status = NackStatus(view[0])
        except ValueError:
            raise DecodeError(f"registration NACK: unknown status 0x{view[0]:02x}") from None
        return RegistrationNack(_decode_id(view[1:], allow_empty=True), status)
    raise DecodeError(f"not a registration type: 0x{msg_type:02x}")


def decode_registration(data: Buffer) -> RegistrationMessage:
    view = as_view(data)
    if not view:
        raise DecodeError("empty registration message")
    return decode_registration_body(view[0], view[1:])
