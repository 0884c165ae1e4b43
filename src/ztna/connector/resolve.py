"""Resolving the names of DNS-pattern services, at the Connector (the thin driver).

The Agent only says which name it wants (`NamedStreamOpen`); the address is found here, on
the Connector's side of the network, so what an Agent can reach is exactly what the
service's patterns cover and what the private DNS says they are — a hosts-file edit on the
Agent widens nothing.

* Without `--dns-server` the system resolver answers (`getaddrinfo`: /etc/hosts, nsswitch,
  resolv.conf), as for any other program on the Connector's host.
* With `--dns-server IP[:PORT]` dnspython asks that server, A and AAAA at once, over UDP
  (TCP when the answer is truncated), without a local cache: the server's own cache and
  TTLs are the truth, and a changed record is used at the next connection.

Failures are one `NameResolutionFailed` with the reason a person can act on (NXDOMAIN, no
address records, timeout, server failure); the stream table answers NAME_UNRESOLVED.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

__all__ = ["NameResolutionFailed", "NameResolver"]


class NameResolutionFailed(Exception):
    """`str()` is the reason, e.g. `NXDOMAIN` or `timeout after 5 s`."""


class NameResolver:
    def __init__(self, server: tuple[str, int] | None, *, timeout: float) -> None:
        self.server = server
        self.timeout = timeout
        self._dns: dns.asyncresolver.Resolver | None = None
        if server is not None:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [server[0]]
            r.port = server[1]
            r.lifetime = timeout
            r.timeout = min(timeout, 2.0)     # per try; several tries fit in the lifetime
            r.cache = None
            self._dns = r

    def describe(self) -> str:
        if self.server is None:
            return "the system resolver"
        host, port = self.server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def resolve(self, name: str) -> list[str]:
        """The name's addresses (IPv4 first, then IPv6, each in the server's order)."""
        if self._dns is None:
            return await self._system(name)
        results = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"),
                                       return_exceptions=True)
        addrs: list[str] = []
        errors: list[BaseException] = []
        for res in results:
            if isinstance(res, BaseException):
                errors.append(res)
            else:
                addrs.extend(res)
        if addrs:
            return addrs
        for exc in errors:
            if isinstance(exc, dns.resolver.NXDOMAIN):
                raise NameResolutionFailed("NXDOMAIN (no such name)")
        for exc in errors:
            if isinstance(exc, dns.exception.Timeout | dns.resolver.LifetimeTimeout):
                raise NameResolutionFailed(f"timeout after {self.timeout:g} s asking {self.describe()}")
        for exc in errors:
            if not isinstance(exc, dns.resolver.NoAnswer):
                raise NameResolutionFailed(f"{type(exc).__name__}: {exc}")
        raise NameResolutionFailed("no A or AAAA record")

    async def _query(self, name: str, rdtype: str) -> list[str]:
        assert self._dns is not None
        answer = await self._dns.resolve(name + ".", rdtype, search=False, raise_on_no_answer=True)
        return [rr.address for rr in answer]

    async def _system(self, name: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos: list[Any] = await asyncio.wait_for(
                loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), self.timeout)
        except TimeoutError:
            raise NameResolutionFailed(f"timeout after {self.timeout:g} s asking the system resolver") from None
        except socket.gaierror as exc:
            raise NameResolutionFailed(exc.strerror or str(exc)) from None
        out: list[str] = []
        for fam, *_rest, addr in infos:
            if fam in (socket.AF_INET, socket.AF_INET6):
                text = str(ipaddress.ip_address(addr[0].split("%")[0]))
                if text not in out:
                    out.append(text)
        out.sort(key=lambda a: ":" in a)    # IPv4 first, stable otherwise
        if not out:
            raise NameResolutionFailed("no address")
        return out
