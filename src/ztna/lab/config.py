"""Lab configuration and the addressing plan (pure: no I/O).

The lab is seven network namespaces named ``<prefix>-<node>``::

    agent 10.1.0.10 ── nata (NAT A) ─┐               ┌── relay 203.0.113.10
               lan 10.1.0.1  wan .11 ├── inet br0 .1 ┘    (Intermediate)
    conn  10.2.0.10 ┬─ natb (NAT B) ─┘  ("internet")
    app   10.2.0.20 ┘  lan 10.2.0.1  wan .12

    IPv6: public 2001:db8:100::/64 (inet ::1, relay ::10, nata ::11, natb ::12);
          LANs routed 2001:db8:a::/64 and 2001:db8:b::/64 behind stateful firewalls,
          or ULA fd00:a::/64 and fd00:b::/64 behind NAT66 (``nat66=True``).

Only TEST-NET-3, RFC 1918 LANs, 2001:db8::/32 and fd00::/8 are used, and no
namespace has a link to the root namespace.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Final

from ztna.errors import UsageError

NODES: Final[tuple[str, ...]] = ("inet", "relay", "nata", "natb", "agent", "conn", "app")
NAT_MODES: Final[tuple[str, ...]] = ("none", "cone", "symmetric")
IP_MODES: Final[tuple[str, ...]] = ("4", "dual", "6only")

PUB4: Final = "203.0.113"
PUB6: Final = "2001:db8:100:"
# Last octet / last group of each public address.
WAN_HOST: Final[dict[str, int]] = {"inet": 1, "relay": 10, "nata": 11, "natb": 12}
LAN4: Final[dict[str, str]] = {"a": "10.1.0", "b": "10.2.0"}
# host -> (LAN letter, host number on that LAN)
HOSTS: Final[dict[str, tuple[str, int]]] = {"agent": ("a", 10), "conn": ("b", 10), "app": ("b", 20)}

_PREFIX_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,7}$")


def base36(n: int) -> str:
    """`n` in lowercase base 36: short, name-safe tags for namespaces and devices."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


# Prefixes unique across concurrent test and benchmark processes: t + pid (at most 5 base36
# characters) + a counter, which keeps them inside the 8 characters a prefix may have.
_counter = itertools.count()


def unique_prefix() -> str:
    return f"t{base36(os.getpid())}{base36(next(_counter) % 1296):0>2}"
_RATE_RE: Final = re.compile(r"^\d+(\.\d+)?([kmgt]?bit|[kmgt]?bps)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class LabConfig:
    """What to build. ``delay_ms``/``jitter_ms`` are one-way, per WAN link (see Lab)."""

    prefix: str = "zt"
    nat_a: str = "cone"  # "none" | "cone" | "symmetric"
    nat_b: str = "cone"
    ip: str = "4"  # "4" | "dual" | "6only"
    nat66: bool = False
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate: str | None = None  # tc rate, e.g. "20mbit"
    udp_timeout: int | None = None  # seconds, conntrack UDP mapping lifetime in the NATs

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise UsageError(f"lab prefix must be 1-8 chars [A-Za-z0-9_], got {self.prefix!r}")
        for side, mode in (("nat_a", self.nat_a), ("nat_b", self.nat_b)):
            if mode not in NAT_MODES:
                raise UsageError(f"{side} must be one of {'|'.join(NAT_MODES)}, got {mode!r}")
        if self.ip not in IP_MODES:
            raise UsageError(f"ip must be one of {'|'.join(IP_MODES)}, got {self.ip!r}")
        if self.nat66 and not self.v6:
            raise UsageError("nat66 needs ip='dual' or ip='6only'")
        if not (self.delay_ms >= 0 and self.jitter_ms >= 0):
            raise UsageError("delay_ms and jitter_ms must be >= 0")
        if not 0 <= self.loss_pct <= 100:
            raise UsageError(f"loss_pct must be within 0..100, got {self.loss_pct}")
        if self.rate is not None and not _RATE_RE.match(self.rate):
            raise UsageError(f"rate must look like '20mbit' or '500kbit', got {self.rate!r}")
        if self.udp_timeout is not None and not 1 <= self.udp_timeout <= 86400:
            raise UsageError(f"udp_timeout must be within 1..86400 s, got {self.udp_timeout}")

    @property
    def v4(self) -> bool:
        return self.ip in ("4", "dual")

    @property
    def v6(self) -> bool:
        return self.ip in ("dual", "6only")

    @property
    def delayed(self) -> bool:
        """True when the WAN links are TAP pairs joined by a delaywire process."""
        return self.delay_ms > 0 or self.jitter_ms > 0

    def nat_mode(self, which: str) -> str:
        if which not in ("a", "b"):
            raise UsageError(f"NAT must be 'a' or 'b', got {which!r}")
        return self.nat_a if which == "a" else self.nat_b

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def lan6_prefix(config: LabConfig, lan: str) -> str:
    """``"2001:db8:a:"`` (routed) or ``"fd00:a:"`` (NAT66); append ``":10"`` for a host."""
    return f"fd00:{lan}:" if config.nat66 else f"2001:db8:{lan}:"


def node_addr(config: LabConfig, node: str, family: int = 4) -> str:
    """The node's primary address: the public one for relay/inet/NATs, the LAN one for hosts."""
    if node not in NODES:
        raise UsageError(f"unknown lab node {node!r}; nodes are {', '.join(NODES)}")
    if family not in (4, 6):
        raise UsageError(f"family must be 4 or 6, got {family!r}")
    if (family == 4 and not config.v4) or (family == 6 and not config.v6):
        raise UsageError(f"lab {config.prefix!r} has no IPv{family} (ip={config.ip!r})")
    if node in WAN_HOST:
        n = WAN_HOST[node]
        return f"{PUB4}.{n}" if family == 4 else f"{PUB6}:{n}"
    lan, n = HOSTS[node]
    return f"{LAN4[lan]}.{n}" if family == 4 else f"{lan6_prefix(config, lan)}:{n}"


def lan_gateway(config: LabConfig, lan: str, family: int) -> str:
    return f"{LAN4[lan]}.1" if family == 4 else f"{lan6_prefix(config, lan)}:1"
