"""Candidate gathering (against the kernel's own list) and RFC 8445 priorities."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess

import pytest

from ztna.p2p.candidates import (
    candidate_priority,
    foundation,
    gather,
    host_candidates,
    interface_addresses,
    is_usable_host_address,
    pair_priority,
)
from ztna.wire.control_messages import MAX_CANDIDATES


def _kernel_addresses(netns: str | None = None) -> set[str]:
    argv = ["ip", "-j", "addr", "show"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    return {a["local"] for link in out for a in link.get("addr_info", [])
            if a.get("family") in ("inet", "inet6")}


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")
def test_interface_addresses_equal_the_kernel_list() -> None:
    # Finding 10: the netlink path yields exactly the kernel's addresses, as text, so a
    # byte-order slip (1.2.0.192 for 192.0.2.1) would show up as a set difference.
    ours = interface_addresses()
    assert set(ours) == _kernel_addresses()
    assert len(ours) == len(set(ours))


@pytest.mark.root
def test_interface_addresses_in_a_namespace_byte_order() -> None:
    ns = "ztnap2pcand"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def run(*argv: str) -> None:
            subprocess.run(["ip", "netns", "exec", ns, *argv], check=True)
        run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        run("ip", "link", "set", "d0", "up")
        run("ip", "link", "set", "lo", "up")
        # Asymmetric bytes: any byte swap would produce a different address.
        run("ip", "addr", "add", "192.0.2.1/24", "dev", "d0")
        run("ip", "addr", "add", "10.20.30.40/8", "dev", "d0")
        run("ip", "-6", "addr", "add", "2001:db8:1:2::3/64", "dev", "d0", "nodad")
        ours = interface_addresses(ns)
        assert set(ours) == _kernel_addresses(ns)
        assert {"192.0.2.1", "10.20.30.40", "2001:db8:1:2::3"} <= set(ours)
        hosts = {c.ip for c in host_candidates(ours, 4434)}
        assert hosts == {"192.0.2.1", "10.20.30.40", "2001:db8:1:2::3"}  # lo/link-local left out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_priorities_rfc8445() -> None:
    # (type_pref << 24) | (local_pref << 8) | (256 - 1), IPv6 local pref above IPv4.
    assert candidate_priority("host", "2001:db8::1") == (126 << 24) | (65535 << 8) | 255
    assert candidate_priority("host", "192.0.2.1") == (126 << 24) | (64511 << 8) | 255
    assert candidate_priority("srflx", "192.0.2.1") == (100 << 24) | (64511 << 8) | 255
    assert candidate_priority("prflx", "192.0.2.1") == (110 << 24) | (64511 << 8) | 255
    assert candidate_priority("relay", "192.0.2.1") == (0 << 24) | (64511 << 8) | 255
    assert candidate_priority("host", "192.0.2.1", 1) == candidate_priority("host", "192.0.2.1") - 256
    order = ["host", "prflx", "srflx", "relay"]
    for better, worse in zip(order, order[1:], strict=False):
        assert candidate_priority(better, "192.0.2.1") > candidate_priority(worse, "2001:db8::1")


def test_pair_priority_rfc8445() -> None:
    g, d = 2130706431, 1694498815
    assert pair_priority(g, d) == (1 << 32) * d + 2 * g + 1
    assert pair_priority(d, g) == (1 << 32) * d + 2 * g
    assert pair_priority(g, g) == (1 << 32) * g + 2 * g


def test_host_filtering_and_dedup() -> None:
    addrs = ["127.0.0.1", "::1", "fe80::1", "169.254.1.1", "0.0.0.0", "::", "224.0.0.1",
             "::ffff:192.0.2.9", "192.0.2.1", "192.0.2.1", "2001:db8::5", "not-an-ip"]
    hosts = host_candidates(addrs, 4434)
    assert [(c.ip, c.port, c.kind) for c in hosts] == [("192.0.2.1", 4434, "host"), ("2001:db8::5", 4434, "host")]
    assert not is_usable_host_address("0.0.0.0")  # never the wildcard as a candidate


def test_gather_srflx_relay_and_limit() -> None:
    addrs = [f"10.0.{i}.1" for i in range(30)] + ["2001:db8::1"]
    cands = gather(5000, addrs, observed=("203.0.113.5", 40000), relay=("198.51.100.1", 4433))
    assert len(cands) == MAX_CANDIDATES
    kinds = [c.kind for c in cands]
    assert kinds[0] == "host" and cands[0].ip == "2001:db8::1"  # IPv6 first
    assert kinds[-2:] == ["srflx", "relay"]
    assert [c.priority for c in cands] == sorted((c.priority for c in cands), reverse=True)
    assert len({c.priority for c in cands}) == len(cands)
    srflx = cands[-2]
    assert (srflx.ip, srflx.port) == ("203.0.113.5", 40000)
    # No NAT: QAD shows a host address, so no srflx duplicate.
    plain = gather(5000, ["192.0.2.1"], observed=("192.0.2.1", 5000))
    assert [c.kind for c in plain] == ["host"]
    # IPv4-only families drop IPv6.
    assert all(ipaddress.ip_address(c.ip).version == 4 for c in gather(5000, addrs, families=(4,)))


def test_foundations() -> None:
    assert foundation("host", "192.0.2.1") == foundation("host", "192.0.2.1")
    assert foundation("host", "192.0.2.1") != foundation("srflx", "192.0.2.1")
    assert foundation("host", "192.0.2.1") != foundation("host", "192.0.2.2")
    assert all(len(foundation(k, "2001:db8::1234:5678", "198.51.100.1")) <= 32
               for k in ("host", "srflx", "prflx", "relay"))
