"""Lab tests (root): the direct path through real NATs in network namespaces."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from .lab_p2p import agent_status, udp_echo, wait_path, ztna_world

pytestmark = pytest.mark.root


@pytest.mark.parametrize("ip", ["4", "dual", "6only"])
def test_cone_cone_goes_direct(lab_factory: Any, tmp_path: Path, ip: str) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", ip=ip, delay_ms=10)
    with ztna_world(lab, tmp_path) as world:
        udp_echo(world, count=3, gap=0.05)      # relay works before the punch ends
        snap = wait_path(world, "direct")
        assert snap["warmup_ms"] > 0
        assert udp_echo(world, count=50) == 50   # byte-exact both ways on the direct path
        p2p = agent_status(world)["p2p"]["services"]["web"]
        assert p2p["path"] == "direct" and p2p["punch"]["state"] == "nominated"


@pytest.mark.parametrize("nats", [("cone", "symmetric"), ("symmetric", "symmetric")])
def test_symmetric_stays_on_relay(lab_factory: Any, tmp_path: Path, nats: tuple[str, str]) -> None:
    lab = lab_factory(nat_a=nats[0], nat_b=nats[1], ip="4")
    with ztna_world(lab, tmp_path) as world:
        wait_path(world, "relay")
        assert udp_echo(world, count=20) == 20
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            p2p = agent_status(world)["p2p"]["services"]["web"]
            if p2p["punch_failures"] >= 1:
                break
            time.sleep(0.2)
        assert p2p["path"] == "relay" and p2p["punch_failures"] >= 1
        assert p2p["path_state"] == "cooldown"
        assert udp_echo(world, count=20) == 20


def test_block_direct_falls_back_and_returns(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", ip="4")
    with ztna_world(lab, tmp_path) as world:
        wait_path(world, "direct")
        # Block the Connector's P2P socket: the relay takes over, traffic keeps flowing.
        lab.block_udp("conn", 4434, direction="both")
        echoed = udp_echo(world, count=100, gap=0.02)
        snap = wait_path(world, "relay", timeout=5)
        assert snap["p2p"]["services"]["web"]["direct_failures"] >= 1
        assert echoed >= 50   # losses only during the ~1 s detection window
        assert udp_echo(world, count=20) == 20
        lab.unblock_udp("conn", 4434)
        snap = wait_path(world, "direct", timeout=60)   # after the 30 s cooldown
        assert snap["p2p"]["services"]["web"]["switches_to_direct"] >= 2
        assert udp_echo(world, count=20) == 20
