"""Synthetic addresses for names: the Agent answers `app1.corp.test A` with one of these.

Theory of operation
-------------------
* One pool per address family (default 100.80.0.0/16 and fd00:80::/64, routed into the
  TUN). An answer binds an address to (service, name) until `ttl + grace` seconds after the
  last answer that named it: a client that honours the TTL always connects while its
  address is still bound, and `grace` covers a resolver cache that hands out the record a
  moment later with the remaining TTL.
* A name keeps its address while bound (a refresh extends the binding), so repeated
  lookups and the A/AAAA pair of one name stay stable.
* Addresses are handed out in order from the start of the pool; an expired address goes to
  the back of a FIFO of released ones, used only once the never-used ones are gone, so an
  address is reused as late as possible (a client that kept an answer beyond its TTL
  reaches nothing rather than another app, for as long as the pool allows).
* Exhaustion: when every address (or `max_entries`) is bound, `answer` returns None and the
  responder says SERVFAIL. A bound address is never taken away from its name early: that
  would send a client that still holds a valid answer to a different app.
* `lookup(ip)` is what the TCP redirect asks when an application connects: (service, name)
  while bound, None after expiry (the connection is refused).

Everything costs O(log n): a heap of (expiry, address) drives the expiry sweep, with stale
heap rows (a binding refreshed since) skipped when they surface.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import Final

from ztna.errors import UsageError

__all__ = ["DEFAULT_POOL_V4", "DEFAULT_POOL_V6", "Binding", "SyntheticPool"]

DEFAULT_POOL_V4: Final = "100.80.0.0/16"
DEFAULT_POOL_V6: Final = "fd00:80::/64"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(slots=True)
class Binding:
    service: str
    name: str
    expires: float


class SyntheticPool:
    def __init__(self, network: str | Network, *, ttl: float, grace: float = 2.0,
                 max_entries: int = 65536) -> None:
        net = ipaddress.ip_network(network, strict=True) if isinstance(network, str) else network
        if ttl <= 0 or grace < 0 or max_entries < 1:
            raise UsageError("pool needs ttl > 0, grace >= 0, max_entries >= 1")
        self.network: Network = net
        self.ttl = ttl
        self.hold = ttl + grace
        self.max_entries = max_entries
        base = int(net.network_address)
        # Skip the all-zeros address (network / subnet-router anycast) and, for IPv4 with
        # room to spare, the broadcast address.
        self._first = base + 1 if net.num_addresses > 2 else base
        self._last = base + net.num_addresses - (2 if net.version == 4 and net.num_addresses > 2 else 1)
        self._fresh = self._first
        self._released: deque[int] = deque()
        self._by_ip: dict[int, Binding] = {}
        self._by_key: dict[tuple[str, str], int] = {}
        self._heap: list[tuple[float, int]] = []
        self.exhausted = 0          # answers refused because nothing was free
        self.expired = 0

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def capacity(self) -> int:
        return min(self.max_entries, self._last - self._first + 1)

    def __len__(self) -> int:
        return len(self._by_ip)

    def __contains__(self, ip: object) -> bool:
        try:
            return ipaddress.ip_address(ip) in self.network   # type: ignore[arg-type]
        except ValueError:
            return False

    def sweep(self, *, now: float) -> int:
        """Release every binding whose time is up; returns how many."""
        heap = self._heap
        n = 0
        while heap and heap[0][0] <= now:
            expires, ip = heapq.heappop(heap)
            b = self._by_ip.get(ip)
            if b is None or b.expires != expires:
                continue                     # refreshed (a later row exists) or gone
            del self._by_ip[ip]
            del self._by_key[(b.service, b.name)]
            self._released.append(ip)
            n += 1
        self.expired += n
        return n

    def answer(self, service: str, name: str, *, now: float) -> Address | None:
        """The address for (service, name), bound for another `ttl + grace` seconds;
        None if the pool is exhausted."""
        self.sweep(now=now)
        key = (service, name)
        ip = self._by_key.get(key)
        if ip is None:
            ip = self._take()
            if ip is None:
                self.exhausted += 1
                return None
            self._by_key[key] = ip
            self._by_ip[ip] = Binding(service, name, 0.0)
        b = self._by_ip[ip]
        b.expires = now + self.hold
        heapq.heappush(self._heap, (b.expires, ip))
        if len(self._heap) > 4 * len(self._by_ip) + 64:
            self._compact()
        return ipaddress.ip_address(ip) if self.version == 4 else ipaddress.IPv6Address(ip)

    def lookup(self, ip: str | Address, *, now: float) -> Binding | None:
        """(service, name) bound to `ip` now, or None."""
        self.sweep(now=now)
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if addr.version != self.version:
            return None
        return self._by_ip.get(int(addr))

    def _take(self) -> int | None:
        if len(self._by_ip) >= self.max_entries:
            return None
        if self._fresh <= self._last:
            ip = self._fresh
            self._fresh += 1
            return ip
        if self._released:
            return self._released.popleft()
        return None

    def _compact(self) -> None:
        self._heap = [(b.expires, ip) for ip, b in self._by_ip.items()]
        heapq.heapify(self._heap)

    def snapshot(self) -> dict[str, object]:
        return {"network": str(self.network), "bound": len(self._by_ip), "capacity": self.capacity,
                "ttl": self.ttl, "exhausted": self.exhausted, "expired": self.expired}
