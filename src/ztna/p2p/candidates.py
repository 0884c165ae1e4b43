"""ICE-style candidates for hole punching: gathering, RFC 8445 priorities, foundations.

Theory of operation
-------------------
A candidate is a transport address the peer may try to reach us at. Every candidate we offer
belongs to **one** UDP socket, the P2P socket that later carries the direct QUIC connection
(the NAT mapping we validate must be the one we use). Kinds:

* ``host``  every usable address of every interface, IPv4 and IPv6, with the socket's port
  (never the wildcard ``0.0.0.0``). The addresses come from netlink
  (`interface_addresses`, the only I/O in this module, a thin pyroute2 call); the kernel
  already returns them as text, so there is no byte-order step to get wrong (Finding 10;
  tests compare the set with ``ip -j addr``).
* ``srflx`` the address the Intermediate saw *this socket* come from (QAD on the P2P socket),
  when it differs from every host address.
* ``prflx`` learned during the checks (`ztna.p2p.punch`), never gathered.
* ``relay`` the Intermediate; informational (the relay path is the QUIC connection to the
  Intermediate, which always exists), never probed.

Priority (RFC 8445 §5.1.2.1): ``(type_pref << 24) | (local_pref << 8) | (256 - component)``,
component 1, type preferences host 126, prflx 110, srflx 100, relay 0. The local preference
puts IPv6 above IPv4 (RFC 8421, "prefer IPv6 when both work") and keeps candidates of one
kind and family distinct by their gathering order. Both sides use this one formula.

Foundation: equal for candidates of the same kind from the same base address (RFC 8445
§5.1.1.3); a short hash keeps it well under the 32-character wire limit.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final

from ztna.errors import UsageError
from ztna.wire.control_messages import MAX_CANDIDATES, Candidate

__all__ = [
    "TYPE_PREFERENCE",
    "candidate_priority",
    "foundation",
    "gather",
    "host_candidates",
    "interface_addresses",
    "is_usable_host_address",
    "local_preference",
    "make_candidate",
    "pair_priority",
]

TYPE_PREFERENCE: Final[dict[str, int]] = {"host": 126, "prflx": 110, "srflx": 100, "relay": 0}
COMPONENT: Final = 1
# IPv6 candidates rank above every IPv4 one of the same kind; within a family the gathering
# order (index) breaks ties so that no two candidates of one kind share a priority.
_LOCAL_PREF_V6: Final = 65535
_LOCAL_PREF_V4: Final = 65535 - 1024
_MAX_INDEX: Final = 1023
# Linux address families as netlink reports them (socket.AF_INET / AF_INET6 on Linux).
_AF_INET: Final = 2
_AF_INET6: Final = 10


def local_preference(ip: str, index: int = 0) -> int:
    """RFC 8445 local preference (0..65535): IPv6 first, then gathering order."""
    if not 0 <= index:
        raise UsageError("index must be >= 0")
    index = min(index, _MAX_INDEX)
    version = ipaddress.ip_address(ip).version
    return (_LOCAL_PREF_V6 if version == 6 else _LOCAL_PREF_V4) - index


def candidate_priority(kind: str, ip: str, index: int = 0) -> int:
    """RFC 8445 §5.1.2.1 priority of a candidate (u32)."""
    try:
        type_pref = TYPE_PREFERENCE[kind]
    except KeyError:
        raise UsageError(f"unknown candidate kind {kind!r}") from None
    return (type_pref << 24) | (local_preference(ip, index) << 8) | (256 - COMPONENT)


def pair_priority(controlling: int, controlled: int) -> int:
    """RFC 8445 §6.1.2.3: G = the controlling side's candidate priority, D = the other."""
    g, d = controlling, controlled
    return (1 << 32) * min(g, d) + 2 * max(g, d) + (1 if g > d else 0)


def foundation(kind: str, base_ip: str, server: str = "") -> str:
    """Same kind + same base address (+ same server for srflx/relay) => same foundation."""
    digest = hashlib.blake2s(f"{kind}|{base_ip}|{server}".encode(), digest_size=6).hexdigest()
    return f"{kind[0]}{digest}"


def make_candidate(kind: str, ip: str, port: int, *, index: int = 0, base_ip: str | None = None,
                   server: str = "") -> Candidate:
    ip = str(ipaddress.ip_address(ip))
    return Candidate(kind=kind, ip=ip, port=port, priority=candidate_priority(kind, ip, index),
                     foundation=foundation(kind, base_ip or ip, server))


def is_usable_host_address(ip: str) -> bool:
    """Addresses a peer could reach: not loopback, link-local, multicast or unspecified.

    Link-local IPv6 needs a zone index the peer cannot know, so it is left out; IPv4
    link-local (169.254/16) is left out too (never routed beyond the link)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return False
    return not (addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified)


def host_candidates(addresses: Iterable[str], port: int, *, families: Sequence[int] = (4, 6)) -> list[Candidate]:
    """Host candidates for `port` from interface addresses (deduplicated, in order)."""
    out: list[Candidate] = []
    seen: set[str] = set()
    per_family = {4: 0, 6: 0}
    for raw in addresses:
        if not is_usable_host_address(raw):
            continue
        ip = str(ipaddress.ip_address(raw))
        version = ipaddress.ip_address(ip).version
        if ip in seen or version not in families:
            continue
        seen.add(ip)
        out.append(make_candidate("host", ip, port, index=per_family[version]))
        per_family[version] += 1
    return out


def gather(
    port: int,
    addresses: Iterable[str],
    *,
    observed: tuple[str, int] | None = None,
    relay: tuple[str, int] | None = None,
    families: Sequence[int] = (4, 6),
) -> tuple[Candidate, ...]:
    """Every candidate of one P2P socket, best first, at most MAX_CANDIDATES.

    `observed` is the QAD address seen *by this socket* (server-reflexive); `relay` the
    Intermediate's address. Room is kept for srflx and relay when there are many hosts.
    """
    hosts = host_candidates(addresses, port, families=families)
    extra: list[Candidate] = []
    if observed is not None:
        ip = str(ipaddress.ip_address(observed[0]))
        if ipaddress.ip_address(ip).version in families and not any(
                c.ip == ip and c.port == observed[1] for c in hosts):
            base = next((c.ip for c in hosts if ipaddress.ip_address(c.ip).version
                         == ipaddress.ip_address(ip).version), ip)
            extra.append(make_candidate("srflx", ip, observed[1], base_ip=base,
                                        server=relay[0] if relay else ""))
    if relay is not None:
        extra.append(make_candidate("relay", relay[0], relay[1]))
    hosts.sort(key=lambda c: c.priority, reverse=True)
    chosen = hosts[: MAX_CANDIDATES - len(extra)] + extra
    chosen.sort(key=lambda c: c.priority, reverse=True)
    return tuple(chosen)


def interface_addresses(netns: str | None = None) -> list[str]:
    """Every address configured on this host's interfaces (IPv4 and IPv6), as text.

    The thin I/O step. In our own namespace: getifaddrs in the native module (no netlink
    library in long-running programs: pyroute2 alone is ~8 MB of an Agent's RSS). In another
    namespace (tests, the lab): one netlink dump through pyroute2, imported here so the rest
    of the module stays pure. For IPv4 the local address is IFA_LOCAL (IFA_ADDRESS is the
    peer on point-to-point links); for IPv6 it is IFA_ADDRESS."""
    if netns is None:
        from ztna import _native

        return _native.interface_addresses()
    from pyroute2 import IPRoute, NetNS

    out: list[str] = []
    ipr = NetNS(netns) if netns else IPRoute()
    try:
        for msg in ipr.get_addr():
            family = msg["family"]
            if family == _AF_INET:
                ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            elif family == _AF_INET6:
                ip = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            else:
                continue
            if ip:
                out.append(str(ip))
    finally:
        ipr.close()
    return out
