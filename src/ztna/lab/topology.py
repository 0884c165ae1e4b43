"""The topology as data: per-node sysctls and ``ip -batch`` scripts (pure).

Building is one ``ip -n NS -batch -`` per node, run in ``BUILD_ORDER``: the node
that owns a link creates the veth with its peer placed *directly* in the other
namespace (``peer name eth0 netns P-relay``), so no interface ever exists in the
root namespace, and a later batch only configures what an earlier one made.

With delay or jitter, each NAT's WAN link is not a veth but two persistent TAP
devices (``wan`` in the NAT, ``nata``/``natb`` on inet's bridge) joined by one
``ztna.lab.delaywire`` process; the kernel has no netem (netlab.md §4).
"""

from __future__ import annotations

from typing import Final

from ztna.lab.config import HOSTS, LAN4, PUB4, PUB6, WAN_HOST, LabConfig, lan6_prefix

BUILD_ORDER: Final[tuple[str, ...]] = ("inet", "nata", "natb", "relay", "agent", "conn", "app")
ROUTERS: Final[tuple[str, ...]] = ("inet", "nata", "natb")
# NAT router -> the hosts on its LAN bridge
LAN_HOSTS: Final[dict[str, tuple[str, ...]]] = {"nata": ("agent",), "natb": ("conn", "app")}


def ns_name(prefix: str, node: str) -> str:
    return f"{prefix}-{node}"


def sysctls(config: LabConfig, node: str) -> dict[str, str]:
    """Per-namespace sysctls, applied before any link exists (``default.*`` then counts)."""
    out = {
        "net.ipv6.conf.all.accept_dad": "0",
        "net.ipv6.conf.default.accept_dad": "0",
        "net.ipv6.conf.all.accept_ra": "0",
        "net.ipv6.conf.default.accept_ra": "0",
        # unprivileged ICMP sockets, so `ping` works for any uid inside the lab
        "net.ipv4.ping_group_range": "0 2147483647",
    }
    if not config.v6:
        out["net.ipv6.conf.all.disable_ipv6"] = "1"
        out["net.ipv6.conf.default.disable_ipv6"] = "1"
    if node in ROUTERS:
        # br_netfilter is built into this kernel: without these, frames *bridged*
        # between two LAN hosts (conn <-> app) would hit the routers' forward chain
        for fam in ("arptables", "iptables", "ip6tables"):
            out[f"net.bridge.bridge-nf-call-{fam}"] = "0"
        out["net.ipv4.ip_forward"] = "1"
        out["net.ipv4.conf.all.send_redirects"] = "0"
        out["net.ipv4.conf.default.send_redirects"] = "0"
        if config.v6:
            out["net.ipv6.conf.all.forwarding"] = "1"
    return out


def nat_sysctls(config: LabConfig) -> dict[str, str]:
    """Conntrack sysctls for the NAT routers (set after the firewall loaded)."""
    if config.udp_timeout is None:
        return {}
    t = str(config.udp_timeout)
    return {
        "net.netfilter.nf_conntrack_udp_timeout": t,
        "net.netfilter.nf_conntrack_udp_timeout_stream": t,
    }


def _veth(local: str, peer_ns: str, peer_if: str) -> str:
    return f"link add {local} type veth peer name {peer_if} netns {peer_ns}"


def _addrs(dev: str, v4: str | None, v6: str | None) -> list[str]:
    out = []
    if v4:
        out.append(f"addr add {v4} dev {dev}")
    if v6:
        out.append(f"addr add {v6} dev {dev} nodad")
    return out


def _defaults(config: LabConfig, gw4: str, gw6: str) -> list[str]:
    out = []
    if config.v4:
        out.append(f"route add default via {gw4}")
    if config.v6:
        out.append(f"route add ::/0 via {gw6}")
    return out


# Frames a delayed link's TAP holds for its delaywire to read: as many as the delaywire's own
# queue (its `--queue`, 10,000), which is the link's buffer. The kernel's default of 1,000
# dropped a burst whenever the userspace forwarder was descheduled for a few milliseconds
# (measured: 2.2 % of a 40 ms-RTT download lost at the TAP, none anywhere else), a loss
# that no real link of that buffer size would have.
TAP_QUEUE = 10_000


def _inet(config: LabConfig) -> list[str]:
    p = config.prefix
    cmds = ["link add br0 type bridge", "link set br0 up"]
    cmds.append(_veth("relay", ns_name(p, "relay"), "eth0"))
    for r in ("nata", "natb"):
        if config.delayed:
            cmds += [f"tuntap add dev {r} mode tap", f"link set dev {r} txqueuelen {TAP_QUEUE}"]
        else:
            cmds.append(_veth(r, ns_name(p, r), "wan"))
    for port in ("relay", "nata", "natb"):
        cmds += [f"link set {port} master br0", f"link set {port} up"]
    cmds += _addrs(
        "br0",
        f"{PUB4}.1/24" if config.v4 else None,
        f"{PUB6}:1/64" if config.v6 else None,
    )
    for r, lan in (("nata", "a"), ("natb", "b")):
        # the "internet" routes a LAN only where nothing translates it
        if config.v4 and config.nat_mode(lan) == "none":
            cmds.append(f"route add {LAN4[lan]}.0/24 via {PUB4}.{WAN_HOST[r]}")
        if config.v6 and not config.nat66:
            cmds.append(f"route add {lan6_prefix(config, lan)}:/64 via {PUB6}:{WAN_HOST[r]}")
    return cmds


def _nat(config: LabConfig, r: str) -> list[str]:
    lan = r[-1]
    cmds = ["tuntap add dev wan mode tap", f"link set dev wan txqueuelen {TAP_QUEUE}"] if config.delayed else []
    cmds += ["link set wan up", "link add lan type bridge", "link set lan up"]
    for host in LAN_HOSTS[r]:
        cmds += [
            _veth(host, ns_name(config.prefix, host), "eth0"),
            f"link set {host} master lan",
            f"link set {host} up",
        ]
    n = WAN_HOST[r]
    cmds += _addrs(
        "wan",
        f"{PUB4}.{n}/24" if config.v4 else None,
        f"{PUB6}:{n}/64" if config.v6 else None,
    )
    cmds += _addrs(
        "lan",
        f"{LAN4[lan]}.1/24" if config.v4 else None,
        f"{lan6_prefix(config, lan)}:1/64" if config.v6 else None,
    )
    cmds += _defaults(config, f"{PUB4}.1", f"{PUB6}:1")
    return cmds


def _host(config: LabConfig, node: str) -> list[str]:
    cmds = ["link set eth0 up"]
    if node == "relay":
        n = WAN_HOST["relay"]
        cmds += _addrs(
            "eth0",
            f"{PUB4}.{n}/24" if config.v4 else None,
            f"{PUB6}:{n}/64" if config.v6 else None,
        )
        return cmds + _defaults(config, f"{PUB4}.1", f"{PUB6}:1")
    lan, n = HOSTS[node]
    p6 = lan6_prefix(config, lan)
    cmds += _addrs(
        "eth0",
        f"{LAN4[lan]}.{n}/24" if config.v4 else None,
        f"{p6}:{n}/64" if config.v6 else None,
    )
    return cmds + _defaults(config, f"{LAN4[lan]}.1", f"{p6}:1")


def batches(config: LabConfig) -> list[tuple[str, str]]:
    """``(node, ip-batch script)`` in the order they must run."""
    out = []
    for node in BUILD_ORDER:
        if node == "inet":
            cmds = _inet(config)
        elif node in LAN_HOSTS:
            cmds = _nat(config, node)
        else:
            cmds = _host(config, node)
        out.append((node, "\n".join(["link set lo up", *cmds]) + "\n"))
    return out
