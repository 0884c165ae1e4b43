"""The lab's pure parts, without root: config validation, addressing, rulesets,
ip-batch scripts and the delaywire's delay line."""

from __future__ import annotations

import random

import pytest

from ztna.errors import UsageError
from ztna.lab import LabConfig
from ztna.lab.config import node_addr
from ztna.lab.delaywire import DelayLine
from ztna.lab.rules import block_ruleset, firewall_ruleset, loss_lines
from ztna.lab.topology import batches, sysctls


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prefix": "toolongpfx"},
        {"prefix": "a-b"},
        {"nat_a": "full"},
        {"ip": "6"},
        {"nat66": True},  # needs IPv6
        {"loss_pct": 101},
        {"delay_ms": -1},
        {"rate": "20 mbit"},
        {"udp_timeout": 0},
    ],
)
def test_bad_config_is_a_usage_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        LabConfig(**kwargs)  # type: ignore[arg-type]  # deliberately wrong values


def test_addresses() -> None:
    dual = LabConfig(ip="dual")
    assert node_addr(dual, "relay", 4) == "203.0.113.10"
    assert node_addr(dual, "relay", 6) == "2001:db8:100::10"
    assert node_addr(dual, "agent", 6) == "2001:db8:a::10"
    assert node_addr(LabConfig(ip="6only", nat66=True), "app", 6) == "fd00:b::20"
    assert node_addr(dual, "nata", 4) == "203.0.113.11"
    with pytest.raises(UsageError):
        node_addr(LabConfig(ip="6only"), "relay", 4)
    with pytest.raises(UsageError):
        node_addr(dual, "router", 4)


def test_firewall_keeps_input_drop_in_every_mode() -> None:
    for mode in ("none", "cone", "symmetric"):
        rules = firewall_ruleset(LabConfig(nat_a=mode), "a")
        assert "policy drop;" in rules.split("chain input")[1].split("}")[0]
        assert 'iifname "lan" oifname "wan" accept' in rules
    assert 'oifname "wan" masquerade\n' in firewall_ruleset(LabConfig(), "a")
    assert "masquerade fully-random" in firewall_ruleset(LabConfig(nat_b="symmetric"), "b")
    assert "masquerade" not in firewall_ruleset(LabConfig(nat_a="none"), "a")
    # NAT66 only when asked: routed IPv6 is filtered, never translated
    assert "table ip6 nat {" not in firewall_ruleset(LabConfig(ip="dual"), "a")
    assert "table ip6 nat {" in firewall_ruleset(LabConfig(ip="dual", nat66=True), "a")
    assert "table ip nat {" not in firewall_ruleset(LabConfig(ip="6only", nat66=True), "a")


def test_loss_rules() -> None:
    assert loss_lines(0) == ["table inet loss", "delete table inet loss"]
    text = "\n".join(loss_lines(12.5))
    assert text.count("numgen random mod 10000 < 1250 drop") == 2  # both directions
    with pytest.raises(UsageError):
        loss_lines(-1)


def test_block_rules() -> None:
    text = block_ruleset([(443, "in"), (53, "out"), (443, "in")])
    assert text.count("udp dport 443 drop") == 2  # input + forward, deduplicated
    assert "chain output" in text and text.split("chain output")[1].count("udp dport 53 drop") == 1
    assert block_ruleset([]) == "table inet block\ndelete table inet block\n"
    with pytest.raises(UsageError):
        block_ruleset([(0, "in")])
    with pytest.raises(UsageError):
        block_ruleset([(1, "sideways")])


def test_batches_never_touch_root_namespace() -> None:
    for cfg in (LabConfig(prefix="x1"), LabConfig(prefix="x1", ip="dual", delay_ms=5)):
        scripts = dict(batches(cfg))
        assert list(scripts) == ["inet", "nata", "natb", "relay", "agent", "conn", "app"]
        for script in scripts.values():
            for line in script.splitlines():
                if "type veth" in line:  # every veth peer goes straight into a lab namespace
                    assert line.split(" netns ")[1].startswith("x1-")
        assert ("tuntap add dev wan mode tap" in scripts["nata"]) == cfg.delayed
    assert "route add 10.1.0.0/24" in dict(batches(LabConfig(nat_a="none")))["inet"]
    assert sysctls(LabConfig(), "agent")["net.ipv6.conf.all.disable_ipv6"] == "1"
    assert sysctls(LabConfig(ip="dual"), "nata")["net.ipv6.conf.all.forwarding"] == "1"


def test_delay_line_delays_and_never_reorders() -> None:
    rng = random.Random(7)
    line = DelayLine(delay=0.010, jitter=0.004, limit=1000, rng=rng.random)
    sent = {}
    for i in range(200):
        now = i * 0.0005
        frame = i.to_bytes(2, "big")
        line.push(frame, now=now)
        sent[frame] = now
    out: list[tuple[float, bytes]] = []
    t = 0.0
    while line.next_due() is not None:
        t += 0.0001
        out += [(t, f) for f in line.pop_due(now=t)]
    assert [f for _, f in out] == [i.to_bytes(2, "big") for i in range(200)]
    delays = [t - sent[f] for t, f in out]
    assert min(delays) >= 0.006 - 1e-9  # delay - jitter at least
    assert max(delays) <= 0.014 + 0.0002  # delay + jitter (+ one poll step)


def test_delay_line_bounded() -> None:
    line = DelayLine(delay=1.0, jitter=0.0, limit=3, rng=random.random)
    assert [line.push(b"x", now=0.0) for _ in range(5)] == [True, True, True, False, False]
    assert line.dropped == 2
    assert line.pop_due(now=0.5) == [] and len(line.pop_due(now=1.0)) == 3
