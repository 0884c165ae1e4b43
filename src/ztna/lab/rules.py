"""nftables rulesets for the lab (pure text; applied with ``nft -f -`` in a namespace).

Each NAT router runs a CPE-like stateful firewall, always, whatever the NAT mode:
``input policy drop`` with ``ct state established,related accept``, and forwarding
only from ``lan`` to ``wan`` plus established/related traffic back. Keeping the input
policy at drop matters (shared netlab.md §1): a router that *accepts* an early
unsolicited punch confirms a conntrack entry ``peer:P -> wan:P``, and the host's own
outbound packet then clashes with it and masquerade picks a random port, which
breaks cone-to-cone hole punching.

NAT modes (IPv4, and IPv6 only with NAT66):

* ``cone``      ``masquerade``: port preserving, endpoint-independent mapping,
                address+port-dependent filtering (a "port-restricted cone").
* ``symmetric`` ``masquerade fully-random``: a new random port per 5-tuple.
* ``none``      no translation; the firewall alone filters (inet routes the LAN).

Loss uses ``numgen random`` at the edges of the WAN link, before conntrack confirms
an entry, so a lost packet leaves no mapping. Fractions of a percent are kept by
drawing from 0..9999. IPv6 neighbour discovery is exempt so loss never turns into
a neighbour-cache failure (ARP is not seen by the ``inet`` family either).

All tables are replaced atomically: ``table X`` + ``delete table X`` + new body in
one ``nft -f`` transaction (nft 1.0.6 needs multi-line syntax, netlab.md §6).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from ztna.errors import UsageError
from ztna.lab.config import LabConfig

MASQ: Final[dict[str, str]] = {"cone": "masquerade", "symmetric": "masquerade fully-random"}
BLOCK_DIRECTIONS: Final[tuple[str, ...]] = ("in", "out", "both")
_ICMP6_ERRORS: Final = "destination-unreachable, packet-too-big, time-exceeded, parameter-problem"


def _replace(family_table: str, body: list[str]) -> list[str]:
    """Lines that atomically drop ``family_table`` and, if ``body`` is set, recreate it."""
    out = [f"table {family_table}", f"delete table {family_table}"]
    if body:
        out.append(f"table {family_table} {{")
        out.extend(body)
        out.append("}")
    return out


def firewall_ruleset(config: LabConfig, which: str) -> str:
    """Firewall + NAT + loss for NAT router ``which`` ("a" or "b")."""
    mode = config.nat_mode(which)
    lines = _replace(
        "inet fw",
        [
            "  chain input {",
            "    type filter hook input priority 0; policy drop;",
            '    iif "lo" accept',
            "    ct state established,related accept",
            '    iifname "lan" accept',
            "    meta l4proto { icmp, ipv6-icmp } accept",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority 0; policy drop;",
            "    ct state established,related accept",
            '    iifname "lan" oifname "wan" accept',
            f"    icmpv6 type {{ {_ICMP6_ERRORS} }} accept",
            "  }",
        ],
    )
    masq = MASQ.get(mode)
    nat4 = [
        "  chain post {",
        "    type nat hook postrouting priority srcnat;",
        f'    oifname "wan" {masq}',
        "  }",
    ]
    lines += _replace("ip nat", nat4 if masq and config.v4 else [])
    lines += _replace("ip6 nat", nat4 if masq and config.nat66 else [])
    lines += loss_lines(config.loss_pct)
    return "\n".join(lines) + "\n"


def loss_lines(loss_pct: float) -> list[str]:
    if not 0 <= loss_pct <= 100:
        raise UsageError(f"loss must be within 0..100 %, got {loss_pct}")
    per_10k = round(loss_pct * 100)
    if per_10k == 0:
        return _replace("inet loss", [])
    nd = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept"
    drop = f"numgen random mod 10000 < {per_10k} drop"
    return _replace(
        "inet loss",
        [
            "  chain pre {",
            "    type filter hook prerouting priority -300;",
            f'    iifname "wan" {nd}',
            f'    iifname "wan" {drop}',
            "  }",
            "  chain post {",
            "    type filter hook postrouting priority 300;",
            f'    oifname "wan" {nd}',
            f'    oifname "wan" {drop}',
            "  }",
        ],
    )


def block_ruleset(blocks: Iterable[tuple[int, str]]) -> str:
    """Drop rules for ``(udp_port, direction)`` pairs on one node.

    ``in`` drops datagrams arriving for that destination port (input, and forward for
    routers), ``out`` drops datagrams the node sends to that port (output, forward),
    ``both`` does both.
    """
    chains: dict[str, list[str]] = {"input": [], "forward": [], "output": []}
    for port, direction in sorted(set(blocks)):
        if not 1 <= port <= 65535:
            raise UsageError(f"UDP port must be within 1..65535, got {port}")
        if direction not in BLOCK_DIRECTIONS:
            allowed = "|".join(BLOCK_DIRECTIONS)
            raise UsageError(f"direction must be one of {allowed}, got {direction!r}")
        hooks = {"in": ("input", "forward"), "out": ("output", "forward")}.get(
            direction, ("input", "forward", "output")
        )
        for hook in hooks:
            rule = f"    udp dport {port} drop"
            if rule not in chains[hook]:
                chains[hook].append(rule)
    body: list[str] = []
    for hook, rules in chains.items():
        if rules:
            head = [f"  chain {hook} {{", f"    type filter hook {hook} priority -10;"]
            body += [*head, *rules, "  }"]
    return "\n".join(_replace("inet block", body)) + "\n"
