"""Admission of new QUIC connection attempts, and the address tokens behind it (pure).

Theory of operation. The native core reports every new connection attempt as an event
with the source address and whether the source address is already validated (by a Retry
token, or by a NEW_TOKEN token from an earlier connection: `may_retry` False means the
token came from our own Retry). `AdmissionPolicy.decide` answers each attempt with one
`Decision`, which the endpoint (`ztna.quic.endpoint`) executes and counts:

1. at the connection limit: `REFUSE` (CONNECTION_LIMIT) — the client hears a refusal;
2. unvalidated, Retry on and allowed: `RETRY` (NEW_ADDRESS) — stateless, costs us nothing,
   so it is answered before the rate limit is charged;
3. the source's handshake budget is spent: `IGNORE` (RATE_LIMITED) — silence, no state;
4. otherwise `ACCEPT`, with the reason saying how the address was validated.

The per-source budget is a token bucket (`SourceRateLimiter`): `rate` handshakes per
second with a burst of `rate`, in a table bounded to `max_sources` sources (the oldest
quarter is evicted when it overflows, so a spoofed-source flood cannot grow it).

`AddressTokenCodec` seals and opens the tokens the Intermediate hands out on the control
stream (docs/protocol.md, AddressToken): 0xA7 || nonce(12) || AES-GCM(key, client IP ||
issued-at u64 ms). Bound to the IP only (NATs change ports), valid for `lifetime` seconds.

Nothing here reads a clock or draws randomness: `now` (monotonic seconds) and `wall_now`
(Unix seconds) are arguments, and so is each token's nonce.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = ["TOKEN_MARKER", "AddressTokenCodec", "AdmissionPolicy", "Decision", "Reason",
           "SourceRateLimiter", "Verdict"]

TOKEN_MARKER: Final = 0xA7
TOKEN_NONCE_LEN: Final = 12
_TAG_LEN: Final = 16
_TIME: Final = struct.Struct(">Q")
# marker + nonce + tag + issued-at + the shortest (IPv4) address
_MIN_TOKEN: Final = 1 + TOKEN_NONCE_LEN + _TAG_LEN + _TIME.size + 4

# Sources tracked by the rate limiter; past this the oldest quarter is forgotten.
MAX_SOURCES: Final = 65536


class Verdict(StrEnum):
    ACCEPT = "accept"
    RETRY = "retry"
    REFUSE = "refuse"
    IGNORE = "ignore"


class Reason(StrEnum):
    TOKEN_VALIDATED = "token_validated"     # a returning client's NEW_TOKEN token
    RETRY_VALIDATED = "retry_validated"     # the token of our own Retry
    UNVALIDATED = "unvalidated"             # accepted without validation (Retry off)
    NEW_ADDRESS = "new_address"             # answered with a Retry
    CONNECTION_LIMIT = "connection_limit"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: Reason
    # How the source address was validated, once that was looked at (rate-limited attempts
    # included); None for refusals and Retries.
    validation: Reason | None = None


class SourceRateLimiter:
    """Token bucket per source address: `rate` per second, burst `rate`, bounded table."""

    __slots__ = ("rate", "buckets", "max_sources")

    def __init__(self, rate: float, *, buckets: dict[str, tuple[float, float]] | None = None,
                 max_sources: int = MAX_SOURCES) -> None:
        self.rate = rate
        # source -> (tokens left, when last charged); may be shared between endpoints
        self.buckets = buckets if buckets is not None else {}
        self.max_sources = max_sources

    def allow(self, source: str, *, now: float) -> bool:
        rate, buckets = self.rate, self.buckets
        tokens, last = buckets.get(source, (rate, now))
        tokens = min(rate, tokens + (now - last) * rate)
        if tokens < 1.0:
            buckets[source] = (tokens, now)
            return False
        buckets[source] = (tokens - 1.0, now)
        if len(buckets) > self.max_sources:
            for key in list(buckets)[: self.max_sources // 4]:
                del buckets[key]
        return True


class AdmissionPolicy:
    """Decides each new connection attempt (see the module docstring for the order)."""

    __slots__ = ("retry", "max_connections", "limiter")

    def __init__(self, *, retry: bool, max_connections: int, limiter: SourceRateLimiter) -> None:
        self.retry = retry
        self.max_connections = max_connections
        self.limiter = limiter

    def decide(self, *, source: str, validated: bool, may_retry: bool, open_connections: int,
               now: float) -> Decision:
        if open_connections >= self.max_connections:
            return Decision(Verdict.REFUSE, Reason.CONNECTION_LIMIT)
        if validated:
            reason = Reason.TOKEN_VALIDATED if may_retry else Reason.RETRY_VALIDATED
        elif self.retry and may_retry:
            return Decision(Verdict.RETRY, Reason.NEW_ADDRESS)
        else:
            reason = Reason.UNVALIDATED
        # Charged only for attempts that will create a connection (Retry answers are
        # stateless and cheap; counting them halved the real rate).
        if not self.limiter.allow(source, now=now):
            return Decision(Verdict.IGNORE, Reason.RATE_LIMITED, reason)
        return Decision(Verdict.ACCEPT, reason, reason)


def _ip_bytes(host: str) -> bytes:
    addr = ipaddress.ip_address(host.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.packed


class AddressTokenCodec:
    """Seals and opens address tokens with one AES-GCM key (16, 24 or 32 bytes)."""

    __slots__ = ("aead", "lifetime")

    def __init__(self, key: bytes, *, lifetime: float) -> None:
        # Imported here: only servers seal tokens, and cryptography is ~10 MB of resident
        # memory a long-running Agent (which imports this module) does not need.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.aead = AESGCM(key)
        self.lifetime = lifetime

    def issue(self, host: str, *, wall_now: float, nonce: bytes) -> bytes:
        if len(nonce) != TOKEN_NONCE_LEN:
            raise ValueError(f"token nonce must be {TOKEN_NONCE_LEN} bytes")
        plain = _ip_bytes(host) + _TIME.pack(int(wall_now * 1000))
        return bytes([TOKEN_MARKER]) + nonce + self.aead.encrypt(nonce, plain, None)

    def validate(self, token: bytes, host: str, *, wall_now: float) -> bool:
        if len(token) < _MIN_TOKEN or token[0] != TOKEN_MARKER:
            return False
        from cryptography.exceptions import InvalidTag

        try:
            plain = self.aead.decrypt(token[1 : 1 + TOKEN_NONCE_LEN], token[1 + TOKEN_NONCE_LEN :], None)
        except InvalidTag:
            return False
        ip, issued = plain[: -_TIME.size], _TIME.unpack(plain[-_TIME.size :])[0] / 1000
        return ip == _ip_bytes(host) and 0 <= wall_now - issued <= self.lifetime
