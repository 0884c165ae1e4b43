"""Address-validation tokens that let a returning client skip the Retry round trip.

QUIC servers prove a client owns its address with a Retry (one extra round trip) or with a
token from an earlier connection (NEW_TOKEN, RFC 9000 §8.1.3). The native core sends
NEW_TOKEN itself and keys it (and its Retry tokens) with this object's `key`, so tokens from a
previous process of the same state dir still validate. The Intermediate also hands a token
out on the control stream (`AddressToken`, docs/protocol.md) for clients that cannot take
NEW_TOKEN; ours present the NEW_TOKEN ones. A reconnect with a session ticket is then truly
0-RTT.

The token format and its checks are `ztna.quic.admission.AddressTokenCodec` (pure); this
module keeps the key — in the state directory (0600) so tokens survive a restart, or in
memory when there is none — and supplies the wall clock and the nonces (injectable).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ztna.quic.admission import TOKEN_MARKER, TOKEN_NONCE_LEN, AddressTokenCodec

MARKER = TOKEN_MARKER


class AddressTokens:
    def __init__(self, key: bytes | None = None, *, lifetime: float = 86400.0,
                 wall_clock: Callable[[], float] = time.time,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.key = key or AESGCM.generate_key(bit_length=128)
        self.codec = AddressTokenCodec(self.key, lifetime=lifetime)
        self.lifetime = lifetime
        self.wall_clock = wall_clock
        self.rng = rng

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

    def issue(self, host: str, *, now: float | None = None) -> bytes:
        """A token for `host`, issued at wall time `now` (default: the injected clock)."""
        wall = self.wall_clock() if now is None else now
        return self.codec.issue(host, wall_now=wall, nonce=self.rng(TOKEN_NONCE_LEN))

    def validate(self, token: bytes, host: str, *, now: float | None = None) -> bool:
        wall = self.wall_clock() if now is None else now
        return self.codec.validate(token, host, wall_now=wall)
