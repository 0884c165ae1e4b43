"""Service ids: the names Agents and Connectors register and route by (docs/protocol.md §2).

Rule: 1..63 ASCII characters (`limits.SERVICE_ID_MAX`) matching `[A-Za-z0-9][A-Za-z0-9_-]*`.
The rule keeps ids printable in logs and metrics labels, and it fits the one-byte length prefix
used everywhere on the wire.

Two entry points with different error families:

* `validate_service_id(s)` — for ids coming from *our* config or API: raises `UsageError`.
* `decode_service_id(raw)` — for id bytes from a peer: raises `DecodeError`. It sits on the
  per-packet hot path (every 0x2F/0x30 DATAGRAM carries an id), so valid ids are memoised in
  a small bounded dict: the regex runs once per distinct id, not once per packet.
"""

from __future__ import annotations

import re
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.limits import SERVICE_ID_MAX

__all__ = [
    "SERVICE_ID_MAX",
    "decode_service_id",
    "encode_service_id",
    "is_valid_service_id",
    "validate_service_id",
]

_ID_TEXT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*", re.ASCII)
_ID_BYTES: Final = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_-]*")

# Bounded because the keys come from peers: a peer cycling through random ids must not grow
# memory. 1024 distinct ids is far more than one deployment serves; beyond that we evict the
# oldest entry (dicts keep insertion order), which is O(1).
_CACHE_MAX: Final = 1024
_cache: dict[bytes, str] = {}


def is_valid_service_id(s: object) -> bool:
    return (
        isinstance(s, str)
        and 1 <= len(s) <= SERVICE_ID_MAX
        and _ID_TEXT.fullmatch(s) is not None
    )


def validate_service_id(s: str) -> str:
    """Return `s` if it is a valid service id, else raise `UsageError`."""
    if not is_valid_service_id(s):
        raise UsageError(
            f"invalid service id {s!r}: need 1..{SERVICE_ID_MAX} characters "
            "matching [A-Za-z0-9][A-Za-z0-9_-]*"
        )
    return s


def encode_service_id(s: str) -> bytes:
    """`[L u8][id]` for a valid id (UsageError otherwise)."""
    validate_service_id(s)
    return bytes((len(s),)) + s.encode("ascii")


def decode_service_id(raw: bytes | bytearray | memoryview) -> str:
    """The id spelled by exactly the bytes `raw` (no length prefix). DecodeError if invalid."""
    key = bytes(raw)  # <= 63 bytes when valid; hashable for the cache
    sid = _cache.get(key)
    if sid is not None:
        return sid
    if not 1 <= len(key) <= SERVICE_ID_MAX or _ID_BYTES.fullmatch(key) is None:
        raise DecodeError(f"invalid service id {key[:SERVICE_ID_MAX + 1]!r}")
    sid = key.decode("ascii")  # cannot fail: the regex admits ASCII only
    if len(_cache) >= _CACHE_MAX:
        del _cache[next(iter(_cache))]
    _cache[key] = sid
    return sid
