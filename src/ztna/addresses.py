"""Socket addresses as people read them, for every log line and error message."""

from __future__ import annotations

from typing import Any


def format_address(address: Any) -> str:
    """`host:port` for logs: IPv6 in brackets (the port is unambiguous then), an IPv4-mapped
    address (`::ffff:1.2.3.4`, what a dual-stack socket reports for IPv4 peers) as plain IPv4,
    a zone id (`fe80::1%eth0`) kept. Accepts a socket address tuple of any length, a
    (host, port) pair, or a bare host (printed without a port)."""
    if isinstance(address, (tuple, list)):
        host, port = str(address[0]), (address[1] if len(address) > 1 else None)
    else:
        host, port = str(address), None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().startswith("::ffff:") and "." in host:
        host = host[7:]
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
