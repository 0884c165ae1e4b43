"""Lab changes the benchmark rows need (nft port forwards, direct-path blocks, path audit).

* ``port_forward``: a DNAT on NAT B's WAN (``203.0.113.12:PORT -> LAN host``), plus the
  one forward-accept rule the CPE firewall needs for DNATed flows. Used by the plain
  underlay baseline (agent -> app with no tunnel, over exactly the wires a direct tunnel
  uses) and by sshuttle (its sshd on ``conn`` must be reachable, as in real deployments).
* ``block_direct``: NAT B drops everything from/to NAT A's side, so every tunnel must go
  through the relay node (nebula's lighthouse relay, ztna's Intermediate). Relay traffic
  is untouched: it comes from 203.0.113.10.
* ``PathAudit``: conntrack accounting on NAT A, zeroed before a measurement and read
  after, tells how many bytes went straight to NAT B versus to the relay node. That is
  how each row proves which path its tunnel really used.
"""

from __future__ import annotations

import re
import subprocess
from typing import Final

from ztna.bench.harness import RowScope
from ztna.lab import Lab

NAT_A_PUB: Final = "203.0.113.11"
NAT_B_PUB: Final = "203.0.113.12"
RELAY_PUB: Final = "203.0.113.10"
LAN_A: Final = "10.1.0.0/24"

_ENTRY: Final = re.compile(r"^(\w+)\s+\d+\s+(?:\d+\s+)?(?:\w+\s+)?src=(\S+) dst=(\S+).*")
_BYTES: Final = re.compile(r"bytes=(\d+)")


def allow_dnat(scope: RowScope, node: str) -> None:
    """Let DNATed flows through the CPE firewall's forward chain (undone on close)."""
    out = scope.lab.run(node, ["nft", "--echo", "--handle", "insert", "rule", "inet", "fw",
                               "forward", "ct", "status", "dnat", "accept"])
    m = re.search(r"# handle (\d+)", out.stdout)
    if m is None:
        raise RuntimeError(f"nft gave no rule handle: {out.stdout!r}")
    handle = m.group(1)
    scope.on_close(f"fw rule {handle} on {node}", lambda: scope.lab.run(
        node, ["nft", "delete", "rule", "inet", "fw", "forward", "handle", handle], check=False))


def port_forward(scope: RowScope, table: str, rules: list[tuple[str, int, str]]) -> None:
    """``rules`` = [(proto, wan_port, "lan_ip:port")] on NAT B."""
    lines = [f"table ip {table} {{", "  chain pre {",
             "    type nat hook prerouting priority dstnat;"]
    lines += [f'    iifname "wan" {proto} dport {port} dnat to {dest}'
              for proto, port, dest in rules]
    lines += ["  }", "}"]
    scope.nft("natb", "\n".join(lines) + "\n", f"ip {table}")
    allow_dnat(scope, "natb")


def block_direct(scope: RowScope) -> None:
    """NAT B drops all traffic between its LAN and NAT A's side (undone on close)."""
    ruleset = "\n".join([
        "table ip benchblk {",
        "  chain forward {",
        "    type filter hook forward priority -10;",
        f"    ip saddr {{ {NAT_A_PUB}, {LAN_A} }} drop",
        f"    ip daddr {{ {NAT_A_PUB}, {LAN_A} }} drop",
        "  }",
        "}",
    ]) + "\n"
    scope.nft("natb", ruleset, "ip benchblk")


class PathAudit:
    """Bytes NAT A forwarded to NAT B (direct) vs to the relay node, between reset/read."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        lab.run("nata", ["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"], check=False)

    def reset(self) -> None:
        self.lab.run("nata", ["conntrack", "-L", "-z"], check=False)

    def read(self) -> dict[str, int]:
        try:
            out = self.lab.run("nata", ["conntrack", "-L"], check=False, timeout=20)
        except subprocess.TimeoutExpired:
            return {}
        totals = {"direct": 0, "relay": 0}
        for line in out.stdout.splitlines():
            m = _ENTRY.match(line)
            if m is None:
                continue
            dst = m.group(3)
            which = "direct" if dst == NAT_B_PUB else "relay" if dst == RELAY_PUB else None
            if which:
                totals[which] += sum(int(b) for b in _BYTES.findall(line))
        return totals
