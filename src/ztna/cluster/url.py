"""The cluster store's address: `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]` or `rediss://…`
(TLS). Pure: validation only, so a bad address is a configuration error (exit 2) before any
connection is tried."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEMES = ("redis", "rediss")
DEFAULT_PORT = 6379


@dataclass(frozen=True, slots=True)
class StoreUrl:
    url: str
    host: str
    port: int
    db: int
    tls: bool

    def redacted(self) -> str:
        """For logs and /healthz: the address without its credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


def parse_store_url(text: str) -> StoreUrl:
    """Raise ValueError with one short reason for anything but a usable Redis address."""
    parts = urlsplit(text.strip())
    if parts.scheme not in SCHEMES:
        raise ValueError("must be redis://HOST:PORT/DB (or rediss:// for TLS)")
    if not parts.hostname:
        raise ValueError("missing host (redis://HOST:PORT/DB)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("bad port (redis://HOST:PORT/DB)") from None
    if port == 0:
        raise ValueError("port 0 cannot be dialled")
    if "[" in parts.netloc:
        ipaddress.IPv6Address(parts.hostname)
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"database must be a number, not {path!r}")
    db = int(path) if path else 0
    if db > 15:
        # Redis' default `databases 16`; a higher number fails at the first command instead.
        raise ValueError(f"database {db} out of range 0..15")
    if parts.query or parts.fragment:
        raise ValueError("no query or fragment allowed (timeouts are the Intermediate's own)")
    return StoreUrl(url=text.strip(), host=parts.hostname, port=port, db=db, tls=parts.scheme == "rediss")
