"""A tiny simulated Internet with NATs and a fake clock, for the pure punch tests.

NAT behaviour (RFC 4787 terms):
* mapping "eim" (endpoint-independent: one public port per internal address and port,
  preserved when free) or "edm" (endpoint-dependent, "symmetric": a fresh random port per
  destination address and port);
* filtering "apdf" (address- and port-dependent: only from a destination the host sent
  to — Linux masquerade, the lab's "cone"), "adf" (address-dependent) or "eif" (none).

Packets take `delay` seconds one way; private addresses are unroutable on the Internet.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

Address = tuple[str, int]


@dataclass
class Nat:
    public_ip: str
    mapping: str = "eim"
    filtering: str = "apdf"
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    out_map: dict[tuple[Address, Address | None], int] = field(default_factory=dict)
    in_map: dict[int, Address] = field(default_factory=dict)
    sent_to: set[tuple[int, Address]] = field(default_factory=set)  # (public port, dst)
    dropped_in: int = 0

    def outbound(self, src: Address, dst: Address) -> Address:
        key = (src, dst if self.mapping == "edm" else None)
        port = self.out_map.get(key)
        if port is None:
            port = src[1] if self.mapping == "eim" and src[1] not in self.in_map else self._free_port()
            self.out_map[key] = port
            self.in_map[port] = src
        self.sent_to.add((port, dst))
        return (self.public_ip, port)

    def _free_port(self) -> int:
        while True:
            port = self.rng.randrange(1024, 65536)
            if port not in self.in_map:
                return port

    def inbound(self, src: Address, dst_port: int) -> Address | None:
        internal = self.in_map.get(dst_port)
        if internal is None:
            self.dropped_in += 1
            return None
        if self.filtering == "apdf":
            ok = (dst_port, src) in self.sent_to
        elif self.filtering == "adf":
            ok = any(p == dst_port and d[0] == src[0] for p, d in self.sent_to)
        else:
            ok = True
        if not ok:
            self.dropped_in += 1
            return None
        return internal


@dataclass
class Host:
    addr: Address              # private (or public when nat is None)
    nat: Nat | None = None
    inbox: list[tuple[float, bytes, Address]] = field(default_factory=list)


class Internet:
    def __init__(self, delay: float = 0.01, loss: float = 0.0, seed: int = 1) -> None:
        self.delay = delay
        self.loss = loss
        self.rng = random.Random(seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, Address, Address, bytes]] = []
        self._seq = 0
        self.public: dict[str, Nat | Host] = {}
        self.blocked: set[str] = set()   # public IPs whose traffic is dropped
        self.delivered = 0

    def add_nat(self, nat: Nat) -> Nat:
        self.public[nat.public_ip] = nat
        return nat

    def add_host(self, host: Host) -> Host:
        if host.nat is None:
            self.public[host.addr[0]] = host
        else:
            host.nat.__dict__.setdefault("hosts", {})[host.addr] = host
        return host

    def send(self, host: Host, data: bytes, dst: Address) -> None:
        src = host.addr if host.nat is None else host.nat.outbound(host.addr, dst)
        if self.loss and self.rng.random() < self.loss:
            return
        self._seq += 1
        heapq.heappush(self._queue, (self.now + self.delay, self._seq, src, dst, data))

    def next_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def step(self, deadlines: list[float]) -> bool:
        """Advance to the earliest of `deadlines` and the next delivery, and deliver what is
        due then; False (nothing moved) when there is neither."""
        times = list(deadlines)
        t_net = self.next_time()
        if t_net is not None:
            times.append(t_net)
        if not times:
            return False
        self.now = max(self.now, min(times))
        self.deliver_due()
        return True

    def deliver_due(self) -> None:
        while self._queue and self._queue[0][0] <= self.now:
            _, _, src, dst, data = heapq.heappop(self._queue)
            if src[0] in self.blocked or dst[0] in self.blocked:
                continue
            target = self.public.get(dst[0])
            if isinstance(target, Host):
                if target.addr == dst:
                    target.inbox.append((self.now, data, src))
                    self.delivered += 1
            elif isinstance(target, Nat):
                internal = target.inbound(src, dst[1])
                if internal is None:
                    continue
                host = target.__dict__.get("hosts", {}).get(internal)
                if host is not None:
                    host.inbox.append((self.now, data, src))
                    self.delivered += 1
            # anything else (private or unknown addresses) is unroutable: dropped
