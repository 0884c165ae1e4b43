"""JSON control messages, frame type 0x20 (docs/protocol.md §4.3).

Body: one UTF-8 JSON object, `{"v": 1, "type": <str>, ...fields}`. JSON keys equal the
dataclass field names. Encoding is canonical: compact separators, sorted keys, ASCII-only
(non-ASCII escaped as \\uXXXX), and fields whose value is None are omitted.

Decoding rules, strict where it protects us and lenient where it keeps v1 extensible:

* not UTF-8, not JSON, not an object, duplicate keys, NaN/Infinity, `v` != 1  -> DecodeError
* unknown `type`                           -> `UnknownMessage` (receivers ignore it)
* known type: required fields present with the right JSON type, ints in range, enums,
  service ids and IP addresses valid       -> else DecodeError
* extra keys in a known type               -> ignored (room for optional fields in v1)
* an optional field may be absent or null.

Each message validates itself in `__post_init__` (UsageError), so an invalid message cannot be
built by us either; the decoder turns those into DecodeError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final

from ztna.errors import DecodeError, UsageError
from ztna.wire._common import U32_MAX, U64_MAX, canonical_ip, check_port, check_uint
from ztna.wire.service_id import validate_service_id

__all__ = [
    "CONTROL_JSON_VERSION",
    "MAX_CANDIDATES",
    "PUNCH_MESSAGES",
    "AddressToken",
    "AgentGone",
    "Candidate",
    "ErrorMessage",
    "GoAway",
    "Hello",
    "JsonMessage",
    "MESH_SIGNAL_MESSAGES",
    "MeshSignal",
    "Ping",
    "Pong",
    "PunchAnswer",
    "PunchOffer",
    "PunchRequest",
    "PunchResult",
    "PunchStart",
    "ServiceHealth",
    "ServiceStatus",
    "StandingCandidates",
    "UnknownMessage",
    "decode_json_body",
    "encode_json_body",
]

CONTROL_JSON_VERSION: Final = 1
# Candidate lists are peer input that fans out into probes; 16 covers host v4/v6 on a few
# interfaces plus srflx/relay with room to spare, and bounds the probe work per session.
MAX_CANDIDATES: Final = 16
MAX_FOUNDATION_LEN: Final = 32
CANDIDATE_KINDS: Final = frozenset({"host", "srflx", "prflx", "relay"})
PUNCH_ROLES: Final = frozenset({"controlling", "controlled"})
_HEX_KEY: Final = re.compile(r"[0-9a-f]{64}")


def _str(value: object, what: str, *, nonempty: bool = False) -> str:
    if not isinstance(value, str) or (nonempty and not value):
        raise UsageError(f"{what} must be a {'non-empty ' if nonempty else ''}str, got {value!r}")
    return value


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise UsageError(f"{what} must be a bool, got {value!r}")
    return value


def _candidates(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(obj, name, value)
    if not isinstance(value, tuple) or not all(isinstance(c, Candidate) for c in value):
        raise UsageError(f"{name} must be a tuple of Candidate")
    if len(value) > MAX_CANDIDATES:
        raise UsageError(f"{name}: at most {MAX_CANDIDATES} candidates, got {len(value)}")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A transport address offered for hole punching (not a message by itself)."""

    kind: str
    ip: str
    port: int
    priority: int
    foundation: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in CANDIDATE_KINDS:
            raise UsageError(f"candidate kind must be one of {sorted(CANDIDATE_KINDS)}")
        object.__setattr__(self, "ip", canonical_ip(self.ip))
        check_port(self.port, lo=1)
        check_uint(self.priority, U32_MAX, "priority")
        _str(self.foundation, "foundation", nonempty=True)
        if len(self.foundation) > MAX_FOUNDATION_LEN:
            raise UsageError(f"foundation longer than {MAX_FOUNDATION_LEN} characters")


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    session: int | None = None

    def __post_init__(self) -> None:
        _str(self.code, "code", nonempty=True)
        _str(self.message, "message")
        if self.session is not None:
            check_uint(self.session, U64_MAX, "session")


@dataclass(frozen=True, slots=True)
class GoAway:
    """The peer is shutting down; reconnect later."""

    TYPE: ClassVar[str] = "goaway"
    reason: str

    def __post_init__(self) -> None:
        _str(self.reason, "reason")


@dataclass(frozen=True, slots=True)
class StandingCandidates:
    """Connector -> Intermediate: the candidates of its P2P socket, published ahead of any
    punch (and again when they change), so a `PunchRequest` can be answered with
    `PunchStart` to both sides at once — one Intermediate<->Connector round trip less."""

    TYPE: ClassVar[str] = "standing_candidates"
    candidates: tuple[Candidate, ...]

    def __post_init__(self) -> None:
        _candidates(self, "candidates")


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> Intermediate, first control frame: a random 64-bit id of this client
    *process*. The Intermediate derives the peer id from it and the certificate, so an
    Agent keeps its id across reconnects and Intermediate restarts and the Connector's
    flows for it survive (docs/protocol.md "Peer ids")."""

    TYPE: ClassVar[str] = "hello"
    instance: int

    def __post_init__(self) -> None:
        check_uint(self.instance, U64_MAX, "instance")


@dataclass(frozen=True, slots=True)
class AddressToken:
    """Intermediate -> client: an address-validation token (hex) to present in the Initial
    of the next connection, so that connection skips the Retry round trip (for clients that
    cannot take QUIC NEW_TOKEN; ztna's own native clients use NEW_TOKEN). Opaque to the client."""

    TYPE: ClassVar[str] = "address_token"
    token: str

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not 2 <= len(self.token) <= 512 or len(self.token) % 2:
            raise UsageError("token must be 2..512 hex characters")
        try:
            bytes.fromhex(self.token)
        except ValueError:
            raise UsageError("token must be hex") from None

    @property
    def token_bytes(self) -> bytes:
        return bytes.fromhex(self.token)


@dataclass(frozen=True, slots=True)
class AgentGone:
    """Intermediate -> Connector: that agent's connection closed, drop its flows."""

    TYPE: ClassVar[str] = "agent_gone"
    agent: int

    def __post_init__(self) -> None:
        check_uint(self.agent, U32_MAX, "agent")


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """Intermediate -> Agent: a service lost its last connector (up=False) or got one; also
    sent on registration when a connector already serves it. `connector` optionally names
    the Connector(s) serving it (their certificate name and connection number), for status
    displays. It is informational, so it takes no part in equality: two statuses saying
    the same about availability are the same status."""

    TYPE: ClassVar[str] = "service_status"
    service: str
    up: bool
    connector: str | None = field(default=None, compare=False)
    # Health of the pool (optional, absent from senders that do not know it): True when at
    # least one Connector's backend is healthy, False when none is and new flows go to the
    # least-recently-failed Connector anyway. It changes what the Agent's status says, so
    # it takes part in equality.
    healthy: bool | None = None

    def __post_init__(self) -> None:
        validate_service_id(self.service)
        _bool(self.up, "up")
        if self.connector is not None:
            _str(self.connector, "connector")
            if len(self.connector) > 256:
                raise UsageError("connector label longer than 256 characters")
        if self.healthy is not None:
            _bool(self.healthy, "healthy")


MAX_HEALTH_DETAIL: Final = 256


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    """Connector -> Intermediate (and -> Agent on a direct connection): the health of its
    backend for `service`, after each registration and on every transition. `detail` is a
    human-readable reason (the last check's outcome), informational only, so it takes no
    part in equality."""

    TYPE: ClassVar[str] = "service_health"
    service: str
    healthy: bool
    detail: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        validate_service_id(self.service)
        _bool(self.healthy, "healthy")
        if self.detail is not None:
            _str(self.detail, "detail")
            if len(self.detail) > MAX_HEALTH_DETAIL:
                raise UsageError(f"detail longer than {MAX_HEALTH_DETAIL} characters")


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    id: int

    def __post_init__(self) -> None:
        check_uint(self.id, U64_MAX, "id")


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    id: int

    def __post_init__(self) -> None:
        check_uint(self.id, U64_MAX, "id")


@dataclass(frozen=True, slots=True)
class PunchRequest:
    """Agent -> Intermediate: please arrange a direct path to `service`."""

    TYPE: ClassVar[str] = "punch_request"
    service: str
    candidates: tuple[Candidate, ...]

    def __post_init__(self) -> None:
        validate_service_id(self.service)
        _candidates(self, "candidates")


@dataclass(frozen=True, slots=True)
class PunchOffer:
    """Intermediate -> Connector: agent `agent` wants a direct path to `service`."""

    TYPE: ClassVar[str] = "punch_offer"
    session: int
    agent: int
    service: str
    candidates: tuple[Candidate, ...]

    def __post_init__(self) -> None:
        check_uint(self.session, U64_MAX, "session")
        check_uint(self.agent, U32_MAX, "agent")
        validate_service_id(self.service)
        _candidates(self, "candidates")


@dataclass(frozen=True, slots=True)
class PunchAnswer:
    """Connector -> Intermediate: the Connector's candidates for `session`."""

    TYPE: ClassVar[str] = "punch_answer"
    session: int
    candidates: tuple[Candidate, ...]

    def __post_init__(self) -> None:
        check_uint(self.session, U64_MAX, "session")
        _candidates(self, "candidates")


@dataclass(frozen=True, slots=True)
class PunchStart:
    """Intermediate -> both: start probing the peer's candidates in `start_in_ms`."""

    TYPE: ClassVar[str] = "punch_start"
    session: int
    service: str
    role: str
    key: str
    peer_candidates: tuple[Candidate, ...]
    start_in_ms: int

    def __post_init__(self) -> None:
        check_uint(self.session, U64_MAX, "session")
        validate_service_id(self.service)
        if not isinstance(self.role, str) or self.role not in PUNCH_ROLES:
            raise UsageError(f"role must be one of {sorted(PUNCH_ROLES)}, got {self.role!r}")
        if not isinstance(self.key, str) or _HEX_KEY.fullmatch(self.key) is None:
            raise UsageError("key must be 64 lowercase hex characters (32 bytes)")
        _candidates(self, "peer_candidates")
        check_uint(self.start_in_ms, U32_MAX, "start_in_ms")

    @property
    def key_bytes(self) -> bytes:
        """The 32-byte probe key (docs/protocol.md §6)."""
        return bytes.fromhex(self.key)


@dataclass(frozen=True, slots=True)
class PunchResult:
    """Outcome of a punch session; on success `ip`/`port` is the nominated peer address."""

    TYPE: ClassVar[str] = "punch_result"
    session: int
    ok: bool
    ip: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        check_uint(self.session, U64_MAX, "session")
        _bool(self.ok, "ok")
        if (self.ip is None) != (self.port is None):
            raise UsageError("ip and port must be given together")
        if self.ip is not None:
            object.__setattr__(self, "ip", canonical_ip(self.ip))
            check_port(self.port, lo=1)


# What one member may pass to another about a punch (docs/protocol.md §3.6): the Agent's
# request and result one way; the start, the Connector's result and errors the other.
MESH_SIGNAL_MESSAGES: Final = (PunchRequest, PunchStart, PunchResult, ErrorMessage)


@dataclass(frozen=True, slots=True)
class MeshSignal:
    """Member <-> member: hole-punch signaling of agent `agent` (the ref of the Agent's
    member) whose Connector is on the other member. `message` is one of
    `MESH_SIGNAL_MESSAGES`, carried as a nested JSON object."""

    TYPE: ClassVar[str] = "mesh_signal"
    agent: int
    message: PunchRequest | PunchStart | PunchResult | ErrorMessage

    def __post_init__(self) -> None:
        check_uint(self.agent, U32_MAX, "agent")
        if not isinstance(self.message, MESH_SIGNAL_MESSAGES):
            raise UsageError(f"a mesh signal carries a punch message, not {type(self.message).__name__}")


_RESERVED_KEYS: Final = frozenset({"v", "type"})


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A JSON message of a type this version does not know; receivers ignore it."""

    type: str
    fields: dict[str, Any]

    def __post_init__(self) -> None:
        _str(self.type, "type")
        if self.type in _BY_TYPE:
            raise UsageError(f"{self.type!r} is a known type; use its class")
        if not isinstance(self.fields, dict) or _RESERVED_KEYS & self.fields.keys():
            raise UsageError("fields must be a dict without 'v' or 'type'")


JsonMessage = (
    ErrorMessage | GoAway | StandingCandidates | Hello | AddressToken | AgentGone | ServiceStatus
    | ServiceHealth | Ping | Pong | PunchRequest
    | PunchOffer | PunchAnswer | PunchStart | PunchResult | MeshSignal | UnknownMessage
)

_CLASSES: Final = (ErrorMessage, GoAway, StandingCandidates, Hello, AddressToken, AgentGone,
                   ServiceStatus, ServiceHealth, Ping, Pong, PunchRequest, PunchOffer, PunchAnswer,
                   PunchStart, PunchResult, MeshSignal)
_BY_TYPE: Final[dict[str, Any]] = {cls.TYPE: cls for cls in _CLASSES}
# The hole-punching signalling messages (docs/p2p.md): a program's dispatch table sends them
# all to its punch machinery.
PUNCH_MESSAGES: Final = (PunchRequest, PunchOffer, PunchAnswer, PunchStart, PunchResult)
_CANDIDATE_FIELDS: Final = frozenset({"candidates", "peer_candidates"})
_MESH_SIGNAL_TYPES: Final = frozenset(cls.TYPE for cls in MESH_SIGNAL_MESSAGES)


# ---- encoding ---------------------------------------------------------------------------

def _to_json(msg: object) -> dict[str, Any]:
    if isinstance(msg, UnknownMessage):
        return {**msg.fields, "v": CONTROL_JSON_VERSION, "type": msg.type}
    if not isinstance(msg, _CLASSES):
        raise UsageError(f"not a JSON control message: {type(msg).__name__}")
    out: dict[str, Any] = {"v": CONTROL_JSON_VERSION, "type": msg.TYPE}
    for f in fields(msg):
        value = getattr(msg, f.name)
        if value is None:
            continue
        if f.name in _CANDIDATE_FIELDS:
            value = [_candidate_to_json(c) for c in value]
        elif isinstance(msg, MeshSignal) and f.name == "message":
            value = _to_json(value)
        out[f.name] = value
    return out


def _candidate_to_json(c: Candidate) -> dict[str, Any]:
    return {f.name: getattr(c, f.name) for f in fields(c)}


def encode_json_body(msg: JsonMessage) -> bytes:
    """Canonical body of a 0x20 frame."""
    try:
        text = json.dumps(_to_json(msg), separators=(",", ":"), sort_keys=True,
                          ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:  # non-JSON values inside UnknownMessage.fields
        raise UsageError(f"message is not JSON-serialisable: {exc}") from None
    return text.encode("ascii")


# ---- decoding ---------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DecodeError("duplicate key in JSON object")
    return obj


def _no_constant(name: str) -> None:
    raise DecodeError(f"JSON constant {name} not allowed")


def _parse(body: bytes) -> object:
    try:
        text = body.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DecodeError("control JSON body is not valid UTF-8 JSON") from None


def _candidate_from_json(obj: object) -> Candidate:
    if not isinstance(obj, dict):
        raise DecodeError("candidate must be a JSON object")
    try:
        return Candidate(**{f.name: obj[f.name] for f in fields(Candidate)})
    except KeyError as exc:
        raise DecodeError(f"candidate: missing field {exc}") from None


def _from_json(cls: Any, obj: dict[str, Any]) -> JsonMessage:
    # `cls` is one of _CLASSES; typed Any because mypy cannot express "a dataclass type whose
    # constructor takes these keyword arguments".
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in obj or obj[f.name] is None:
            if f.default is None:  # optional field
                continue
            raise DecodeError(f"{cls.TYPE}: missing field {f.name!r}")
        value = obj[f.name]
        if f.name in _CANDIDATE_FIELDS:
            if not isinstance(value, list) or len(value) > MAX_CANDIDATES:
                raise DecodeError(f"{f.name} must be a list of at most {MAX_CANDIDATES}")
            value = tuple(_candidate_from_json(c) for c in value)
        elif cls is MeshSignal and f.name == "message":
            if not isinstance(value, dict):
                raise DecodeError("mesh_signal: 'message' must be a JSON object")
            # Checked before decoding it, so nesting cannot recurse.
            inner = value.get("type")
            if inner not in _MESH_SIGNAL_TYPES:
                raise DecodeError(f"mesh_signal: cannot carry {inner!r}")
            value = _decode_object(value)
        kwargs[f.name] = value
    msg: JsonMessage = cls(**kwargs)
    return msg


def decode_json_body(body: bytes | bytearray | memoryview) -> JsonMessage:
    """Decode the body of a 0x20 frame (DecodeError only)."""
    obj = _parse(bytes(body))
    if not isinstance(obj, dict):
        raise DecodeError("control JSON body must be an object")
    return _decode_object(obj)


def _decode_object(obj: dict[str, Any]) -> JsonMessage:
    version = obj.get("v")
    if type(version) is not int or version != CONTROL_JSON_VERSION:
        raise DecodeError(f"control JSON: unsupported version {version!r}")
    msg_type = obj.get("type")
    if not isinstance(msg_type, str):
        raise DecodeError("control JSON: 'type' must be a string")
    cls = _BY_TYPE.get(msg_type)
    try:
        if cls is None:
            rest = {k: v for k, v in obj.items() if k not in _RESERVED_KEYS}
            return UnknownMessage(msg_type, rest)
        return _from_json(cls, obj)
    except UsageError as exc:
        raise DecodeError(f"control JSON {msg_type!r}: {exc}") from None
