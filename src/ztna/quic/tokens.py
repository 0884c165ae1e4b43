"""Address-validation tokens that let a returning client skip the Retry round trip.

QUIC servers prove a client owns its address with a Retry (one extra round trip) or with a
token from an earlier connection (NEW_TOKEN, RFC 9000 §8.1.3). The native core sends
NEW_TOKEN itself and keys it (and its Retry tokens) with this object's `key`, so tokens from a
previous process of the same state dir still validate. The Intermediate also hands a token
out on the control stream (`AddressToken`, docs/protocol.md) for clients that cannot take
NEW_TOKEN; ours present the NEW_TOKEN ones. A reconnect with a session ticket is then truly
0-RTT.

Token = 0xA7 || nonce(12) || AES-GCM(key, client IP || issued-at u64 ms). Bound to the IP
only (NATs change ports), valid for `lifetime` seconds. The key lives in the state
directory (0600) so tokens survive a restart, or in memory when there is none.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MARKER = 0xA7
_TIME = struct.Struct(">Q")


class AddressTokens:
    def __init__(self, key: bytes | None = None, *, lifetime: float = 86400.0) -> None:
        self.key = key or AESGCM.generate_key(bit_length=128)
        self.aead = AESGCM(self.key)
        self.lifetime = lifetime

    @classmethod
    def from_state_dir(cls, directory: str | Path | None, *, lifetime: float = 86400.0) -> AddressTokens:
        if not directory:
            return cls(lifetime=lifetime)
        path = Path(directory) / "address-token.key"
        try:
            key = path.read_bytes()
            if len(key) == 16:
                return cls(key, lifetime=lifetime)
        except OSError:
            pass
        key = AESGCM.generate_key(bit_length=128)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return cls(key, lifetime=lifetime)

    @staticmethod
    def _ip_bytes(host: str) -> bytes:
        addr = ipaddress.ip_address(host.split("%")[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return addr.packed

    def issue(self, host: str, *, now: float | None = None) -> bytes:
        issued = int((time.time() if now is None else now) * 1000)
        nonce = os.urandom(12)
        plain = self._ip_bytes(host) + _TIME.pack(issued)
        return bytes([MARKER]) + nonce + self.aead.encrypt(nonce, plain, None)

    def validate(self, token: bytes, host: str, *, now: float | None = None) -> bool:
        if len(token) < 1 + 12 + 16 + 8 + 4 or token[0] != MARKER:
            return False
        try:
            plain = self.aead.decrypt(token[1:13], token[13:], None)
        except InvalidTag:
            return False
        ip, issued = plain[:-8], _TIME.unpack(plain[-8:])[0] / 1000
        current = time.time() if now is None else now
        return ip == self._ip_bytes(host) and 0 <= current - issued <= self.lifetime
