"""The lab itself, for real, in namespaces (root): reachability, NAT behaviour,
impairments, side-by-side labs and clean teardown."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess

import pytest
from click.testing import CliRunner
from lab_helpers import helper, punch, spawn_ready

from ztna.lab import NODES, Lab, LabConfig

pytestmark = pytest.mark.root


def pings(lab: Lab, node: str, target: str, count: int = 1) -> subprocess.CompletedProcess[str]:
    return lab.run(node, ["ping", "-c", str(count), "-i", "0.2", "-W", "1", target], check=False)


def rtts(lab: Lab, node: str, target: str, count: int) -> list[float]:
    out = pings(lab, node, target, count).stdout
    return [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


@pytest.mark.parametrize(
    ("ip", "nat66"), [("4", False), ("dual", False), ("6only", False), ("6only", True)]
)
def test_relay_reachable_and_app_private(lab_factory, ip: str, nat66: bool) -> None:
    lab = lab_factory(ip=ip, nat66=nat66)
    families = {"4": [4], "dual": [4, 6], "6only": [6]}[ip]
    for fam in families:
        relay = lab.addr("relay", fam)
        assert pings(lab, "agent", relay).returncode == 0, (fam, "agent -> relay")
        assert pings(lab, "conn", relay).returncode == 0, (fam, "conn -> relay")
        app = lab.addr("app", fam)
        assert pings(lab, "conn", app).returncode == 0, (fam, "conn -> app (same LAN)")
        assert pings(lab, "agent", app).returncode != 0, (fam, "agent must not reach the app")
    if ip == "6only":  # no IPv4 anywhere
        addrs = lab.run("agent", ["ip", "-4", "-o", "addr"]).stdout
        assert "inet " not in addrs.replace("inet 127.0.0.1", "")
    assert lab.addr("app", 6 if ip == "6only" else 4) in (
        {"10.2.0.20", "2001:db8:b::20", "fd00:b::20"}
    )


def test_relay_cannot_reach_agent_unsolicited(lab_factory) -> None:
    lab = lab_factory(ip="dual", nat_a="none")
    # routed (no NAT) LANs: inet has a route, but the stateful firewall drops it
    assert pings(lab, "relay", lab.addr("agent", 4)).returncode != 0
    assert pings(lab, "relay", lab.addr("agent", 6)).returncode != 0
    assert pings(lab, "agent", lab.addr("relay", 4)).returncode == 0


def test_cone_cone_hole_punch_succeeds(lab_factory) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone")
    ok_a, ok_b, mapped_a, mapped_b = punch(lab)
    assert (ok_a, ok_b) == (True, True)
    # port-preserving masquerade: the rendezvous server saw the WAN address, port 40000
    assert mapped_a == "203.0.113.11:40000"
    assert mapped_b == "203.0.113.12:40000"


def test_cone_cone_hole_punch_nat66(lab_factory) -> None:
    lab = lab_factory(ip="6only", nat66=True)
    ok_a, ok_b, mapped_a, _ = punch(lab, family=6)
    assert (ok_a, ok_b) == (True, True)
    assert mapped_a == "2001:db8:100::11:40000"


def test_symmetric_cone_hole_punch_fails(lab_factory) -> None:
    lab = lab_factory(nat_a="symmetric", nat_b="cone")
    ok_a, ok_b, mapped_a, mapped_b = punch(lab, timeout=2.5)
    assert mapped_b == "203.0.113.12:40000"  # rendezvous worked for both ...
    assert mapped_a.startswith("203.0.113.11:")
    assert (ok_a, ok_b) == (False, False)  # ... but no direct datagram got through


def test_delay_adds_rtt(lab_factory) -> None:
    plain = lab_factory()
    delayed = lab_factory(delay_ms=10)
    # the first echo also pays for ARP across the wire: drop it
    base = statistics.median(rtts(plain, "agent", plain.addr("relay"), 4)[1:])
    slow = statistics.median(rtts(delayed, "agent", delayed.addr("relay"), 6)[1:])
    assert base < 5
    assert 17 <= slow <= 30  # one wire (NAT A's WAN link) crossed twice: 2 x 10 ms


def test_loss_drops_configured_share(lab_factory) -> None:
    lab = lab_factory(loss_pct=20)
    pings(lab, "agent", lab.addr("relay"), 3)  # warm ARP
    counter = spawn_ready(lab, "relay", "count", 5000, 4, 10)
    lab.run("agent", helper("blast", lab.addr("relay"), 5000, 4, 200))
    lost = 200 - int(counter.communicate(timeout=15)[0].strip())
    assert 10 <= lost <= 80, lost  # 5 %..40 % of 200 through one lossy hop (expected 20 %)
    lab.set_loss(0)
    counter = spawn_ready(lab, "relay", "count", 5001, 4, 3)
    lab.run("agent", helper("blast", lab.addr("relay"), 5001, 4, 50))
    assert int(counter.communicate(timeout=10)[0].strip()) == 50


def test_block_unblock_udp_and_flush_nat(lab_factory) -> None:
    lab = lab_factory(udp_timeout=7)
    spawn_ready(lab, "relay", "echo", 7000, 4)
    ask = helper("ask", lab.addr("relay"), 7000, 4, 1.0)
    assert lab.run("agent", ask, check=False).returncode == 0
    lab.block_udp("relay", 7000)
    assert lab.run("agent", ask, check=False).returncode == 1
    assert lab.status()["blocks"] == {"relay": [[7000, "in"]]}
    lab.unblock_udp("relay", 7000)
    assert lab.run("agent", ask, check=False).returncode == 0
    # the agent's mapping to the relay exists in NAT A until the NAT "reboots"
    entries = lab.run("nata", ["conntrack", "-L", "-p", "udp"]).stdout
    assert "dport=7000" in entries
    lab.flush_nat("a")
    assert "dport=7000" not in lab.run("nata", ["conntrack", "-L", "-p", "udp"]).stdout
    timeout = lab.run("nata", ["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout"]).stdout
    assert timeout.strip() == "7"


def test_two_labs_side_by_side(lab_factory) -> None:
    one = lab_factory(nat_a="symmetric")
    two = lab_factory(ip="dual")
    names = netns_names()
    assert {one.ns(n) for n in NODES} <= names and {two.ns(n) for n in NODES} <= names
    assert pings(one, "agent", one.addr("relay")).returncode == 0
    assert pings(two, "agent", two.addr("relay", 6)).returncode == 0
    one.down()
    assert not {one.ns(n) for n in NODES} & netns_names()
    assert pings(two, "agent", two.addr("relay")).returncode == 0


def test_down_leaves_nothing(lab_factory) -> None:
    before = root_links()
    lab = lab_factory(delay_ms=2, jitter_ms=1, rate="50mbit")
    assert root_links() == before  # nothing was ever created in the root namespace
    sleeper = lab.spawn("conn", ["sleep", "300"])
    pids = [p["pid"] for p in lab.status()["processes"]]
    assert sleeper.pid in pids and len(pids) == 3  # two delay wires + the sleeper
    # an untracked process inside a namespace is found and killed too
    stray = subprocess.Popen(["ip", "netns", "exec", lab.ns("app"), "sleep", "300"])
    lab.down()
    stray.wait(timeout=5)
    assert not {lab.ns(n) for n in NODES} & netns_names()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")  # killed and reaped
    assert not os.path.exists(f"/run/ztna-lab/{lab.config.prefix}.json")
    assert root_links() == before
    lab.down()  # idempotent


def test_up_replaces_leftover_lab(lab_factory) -> None:
    old = lab_factory()
    orphan = old.spawn("agent", ["sleep", "300"])
    # a "crashed" run: a new Lab with the same prefix must clean up and rebuild
    new = Lab(LabConfig(prefix=old.config.prefix, ip="dual")).up()
    try:
        assert orphan.wait(timeout=5) is not None
        assert pings(new, "agent", new.addr("relay", 6)).returncode == 0
    finally:
        new.down()


def test_cli_up_status_exec_down(lab_factory) -> None:
    from ztna.cli.lab import lab as lab_cli
    from ztna.lab.config import unique_prefix

    prefix = unique_prefix()
    runner = CliRunner()
    try:
        res = runner.invoke(lab_cli, ["up", "-p", prefix, "--nat-b", "symmetric", "--loss", "1"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(lab_cli, ["status", "-p", prefix, "--json"])
        st = json.loads(res.output)
        assert st["up"] and st["nats"]["b"]["mode"] == "symmetric"
        assert st["nodes"]["relay"]["ipv4"] == "203.0.113.10"
        assert st["impairments"]["loss_pct"] == 1
        res = runner.invoke(lab_cli, ["exec", "-p", prefix, "agent", "--", "sh", "-c", "exit 3"])
        assert res.exit_code == 3
        res = runner.invoke(lab_cli, ["block", "-p", prefix, "relay", "443"])
        assert res.exit_code == 0, res.output
        assert "dport 443" in Lab.attach(prefix).run("relay", ["nft", "list", "ruleset"]).stdout
    finally:
        res = runner.invoke(lab_cli, ["down", "-p", prefix])
    assert res.exit_code == 0, res.output
    assert not {f"{prefix}-{n}" for n in NODES} & netns_names()
    res = runner.invoke(lab_cli, ["status", "-p", prefix])
    assert res.exit_code == 1 and "no lab" in res.output
